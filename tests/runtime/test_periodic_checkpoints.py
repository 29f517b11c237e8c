"""Periodic checkpoints come every N steps and every T seconds, and a job
started by hand (without singularity-run) records its own run."""

from __future__ import annotations

import torch

from slurm_singularity.runtime import checkpoint
from slurm_singularity.runtime.api import CheckpointReason, JobShape, StopReason
from slurm_singularity.runtime.history import read_history
from slurm_singularity.runtime.job import Job


def _train(tmp_path, steps: int, **job_kwargs) -> None:
    job = Job(shape=JobShape(2, 1), device=torch.device("cpu"), deterministic=True,
              ckpt_dir=tmp_path, **job_kwargs)
    model = torch.nn.Linear(4, 1)
    data = torch.utils.data.TensorDataset(torch.randn(128, 4), torch.randn(128, 1))
    trainer = job.trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data,
                          batch_size=4)
    for step in trainer.steps(steps):
        for x, y in step.batches():
            ((model(x) - y) ** 2).mean().backward()


def test_a_checkpoint_every_t_seconds_is_written_at_step_boundaries(tmp_path):
    _train(tmp_path, 3, ckpt_every_s=1e-6)
    metas = checkpoint.list_meta(tmp_path)
    assert [m.step for m in metas] == [3, 2]
    assert all(m.reason is CheckpointReason.PERIODIC for m in metas)


def test_a_run_started_by_hand_appends_its_own_history_record(tmp_path):
    _train(tmp_path, 2)
    _train(tmp_path, 4)
    first, second = read_history(tmp_path)
    assert (first.first_step, first.last_step, first.stop) == (0, 2, StopReason.FINISHED)
    assert (second.first_step, second.last_step) == (2, 4)
    assert checkpoint.list_meta(tmp_path)[0].reason is CheckpointReason.FINAL
