"""Bad training-shape options (issue 17 item 2) are refused when the trainer
is built or the pass starts, naming the option and what was passed; a
checkpoint of another optimizer layout or without a scaler's state is
refused before anything is loaded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slurm_singularity.runtime.api import JobShape, RuntimeSetupError
from slurm_singularity.runtime.job import Job

DATA = torch.utils.data.TensorDataset(torch.randn(32, 2), torch.randn(32, 1))


def _job(ckpt=None):
    return Job(shape=JobShape(2, 1), device=torch.device("cpu"), deterministic=True,
               ckpt_dir=ckpt)


def _gan():
    g, d = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    return {"g": g, "d": d}, {"g": torch.optim.SGD(g.parameters(), lr=0.1),
                              "d": torch.optim.SGD(d.parameters(), lr=0.1)}


@pytest.mark.parametrize("make, words", [
    (lambda m, o: dict(optimizer="adam"), "optimizer=str is neither a torch optimizer nor"),
    (lambda m, o: dict(optimizer={"g": o["g"], "d": "sgd"}), r"optimizer\['d'\] is a str"),
    (lambda m, o: dict(optimizer={"g": o["g"], "d": torch.optim.SGD(m["g"].parameters(),
                                                                      lr=1)}),
     r"is in optimizer\['g'\] and optimizer\['d'\]"),
    (lambda m, o: dict(scheduler=torch.optim.lr_scheduler.StepLR(o["g"], 1)),
     "with several optimizers pass the schedulers as a dict by optimizer name"),
    (lambda m, o: dict(scheduler={"x": torch.optim.lr_scheduler.StepLR(o["g"], 1)}),
     r"scheduler\['x'\] has no optimizer of that name"),
    (lambda m, o: dict(accumulate=0), "accumulate=0 must be an int of at least 1"),
    (lambda m, o: dict(scaler="fp16"), "scaler=str is not a torch.amp.GradScaler"),
])
def test_a_bad_option_is_refused_at_build_naming_it(make, words):
    models, opts = _gan()
    kwargs = {"optimizer": opts, **make(models, opts)}
    with pytest.raises(RuntimeSetupError, match=words):
        _job().trainer(models, kwargs.pop("optimizer"), DATA, batch_size=2, **kwargs)


def test_a_pass_without_a_name_on_a_trainer_of_several_optimizers_names_them():
    models, opts = _gan()
    trainer = _job().trainer(models, opts, DATA, batch_size=2)
    step = next(trainer.steps(1))
    with pytest.raises(RuntimeSetupError, match=r"several optimizers \('g', 'd'\): name the one"):
        next(step.batches())
    with pytest.raises(RuntimeSetupError, match="optimizer 'x' is not this trainer's"):
        next(step.ranks("x"))


def test_a_checkpoint_of_another_optimizer_layout_or_scaler_is_refused(tmp_path):
    models, opts = _gan()
    trainer = _job(tmp_path).trainer(models, opts, DATA, batch_size=2)
    for step in trainer.steps(1):
        for x, y in step.batches("d"):
            F.mse_loss(models["d"](x), y).backward()
    model = torch.nn.Linear(2, 1)
    with pytest.raises(RuntimeSetupError, match="was saved with optimizers g, d, this run has "
                                                "one optimizer"):
        _job(tmp_path).trainer(model, torch.optim.SGD(model.parameters(), lr=1), DATA,
                               batch_size=2)
    models, opts = _gan()
    with pytest.raises(RuntimeSetupError, match="has no GradScaler state, this run passes"):
        _job(tmp_path).trainer(models, opts, DATA, batch_size=2,
                               scaler=torch.amp.GradScaler("cpu"))
