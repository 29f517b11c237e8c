"""Restore checks every choice a checkpoint recorded (runtime/restore.py):
a run that differs in format, buffer policy, world size, batch size, LR
scheduler or model is refused before anything is loaded, with an error that
names the field and both values; the same choices resume as before."""

from __future__ import annotations

import pytest
import torch

from slurm_singularity.runtime import checkpoint
from slurm_singularity.runtime.api import BufferPolicy, CheckpointReason, JobShape, RuntimeSetupError
from slurm_singularity.runtime.job import Job


def _trainer(ckpt_dir, *, world=4, batch_size=2, buffers=BufferPolicy.BROADCAST,
             scheduler=False, width=3):
    """A small trainer with a BatchNorm (so it has buffers) on one CPU device."""
    torch.manual_seed(0)
    job = Job(shape=JobShape(world, 1), device=torch.device("cpu"), deterministic=True,
              ckpt_dir=ckpt_dir)
    model = torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.BatchNorm1d(width),
                                torch.nn.Linear(width, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(optimizer, 1) if scheduler else None
    data = torch.utils.data.TensorDataset(torch.randn(64, 2), torch.randn(64, 1))
    trainer = job.trainer(model, optimizer, data, batch_size=batch_size, buffers=buffers,
                          scheduler=sched)
    return trainer, model


def _train(trainer, model, steps: int) -> None:
    for step in trainer.steps(steps):
        for x, y in step.batches():
            ((model(x) - y) ** 2).mean().backward()


@pytest.fixture
def saved(tmp_path):
    """A directory with the checkpoint of step 2 of a BROADCAST run, W=4, batch 2."""
    trainer, model = _trainer(tmp_path)
    _train(trainer, model, 2)
    return tmp_path


@pytest.mark.parametrize("change, message", [
    (dict(buffers=BufferPolicy.PER_RANK),
     "was saved with buffers=BufferPolicy.BROADCAST, this run asks for "
     "buffers=BufferPolicy.PER_RANK"),
    (dict(world=2), "world size W=4, this job has W=2"),
    (dict(batch_size=3), "used batch_size=2, this run asks for 3"),
    (dict(scheduler=True), "has no LR scheduler state, this run passes scheduler"),
    (dict(width=5), "does not fit this model or optimizer: "),
])
def test_a_run_that_differs_from_the_checkpoint_is_refused_naming_the_field(
        saved, change, message):
    with pytest.raises(RuntimeSetupError, match="checkpoint of step 2 in ") as err:
        _trainer(saved, **change)
    assert message in str(err.value)


def test_a_per_rank_checkpoint_restored_under_broadcast_is_refused(tmp_path):
    trainer, model = _trainer(tmp_path, buffers=BufferPolicy.PER_RANK)
    _train(trainer, model, 1)
    with pytest.raises(RuntimeSetupError, match="saved with buffers=BufferPolicy.PER_RANK, "
                                                "this run asks for buffers=BufferPolicy.BROADCAST"):
        _trainer(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(format=99), "has state format 99; this runtime reads format 1"),
    (lambda s: s.pop("buffer_policy"), "lacks field(s) buffer_policy"),
    (lambda s: s.update(buffer_policy="sometimes"), "buffers='sometimes' (unknown)"),
    (lambda s: s.update(ranks=s["ranks"][:2]), "field ranks lacks logical rank(s) 2, 3"),
])
def test_a_checkpoint_with_a_foreign_or_missing_field_is_refused(tmp_path, edit, message):
    trainer, _ = _trainer(None)
    state = trainer.state()
    edit(state)
    checkpoint.write(tmp_path, 5, state, devices=1, world_size=4,
                     reason=CheckpointReason.PERIODIC)
    with pytest.raises(RuntimeSetupError, match="checkpoint of step 5 in ") as err:
        _trainer(tmp_path)
    assert message in str(err.value)


def test_the_same_choices_resume_at_the_saved_step(saved):
    trainer, _ = _trainer(saved)
    assert trainer.step == 2
