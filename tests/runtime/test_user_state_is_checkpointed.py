"""User state (issue 17 item 1): objects with state_dict/load_state_dict and
dicts or lists of plain values, registered with the trainer, come back with
the checkpoint, in place; what cannot is refused at registration, naming
the name and the type. (Across requeues at other D: the GAN example in
test_training_shapes_are_bitwise_equal_on_any_number_of_devices.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slurm_singularity.runtime.api import JobShape, RuntimeSetupError
from slurm_singularity.runtime.job import Job


def _trainer(ckpt, **kwargs):
    job = Job(shape=JobShape(2, 1), device=torch.device("cpu"), deterministic=True,
              ckpt_dir=ckpt)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    data = torch.utils.data.TensorDataset(torch.randn(32, 3), torch.randn(32, 1))
    return model, job.trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data,
                              batch_size=2, **kwargs)


def _train(model, trainer, total):
    for step in trainer.steps(total):
        for x, y in step.batches():
            F.mse_loss(model(x), y).backward()


def test_registered_state_comes_back_in_place_after_a_restart(tmp_path):
    model, trainer = _trainer(tmp_path)
    best = {"loss": float("inf"), "wandb_id": "abc123", "patience": 0}
    history: list = []
    ema = torch.nn.Linear(3, 1)
    trainer.register_state("best", best)
    trainer.register_state("ema", ema)
    trainer.register_state("history", history)
    for step in trainer.steps(3):
        for x, y in step.batches():
            F.mse_loss(model(x), y).backward()
        best["loss"] = 1.0 / (step.index + 1)
        best["patience"] += 1
        history.append((step.index, {"lr": 0.1}))
        with torch.no_grad():
            ema.weight.mul_(0.5).add_(model.weight, alpha=0.5)
    saved_ema = ema.weight.detach().clone()

    again_best = {"loss": float("inf"), "wandb_id": "new", "patience": 0}
    again_ema = torch.nn.Linear(3, 1)
    again_history: list = ["stale"]
    _, again = _trainer(tmp_path, state={"best": again_best})   # keyword at build
    assert again.step == 3
    assert again_best == {"loss": 1.0 / 3, "wandb_id": "abc123", "patience": 3}
    again.register_state("ema", again_ema)                      # registered after the restore
    again.register_state("history", again_history)
    assert torch.equal(again_ema.weight, saved_ema)
    assert again_history == [(0, {"lr": 0.1}), (1, {"lr": 0.1}), (2, {"lr": 0.1})]


def test_state_not_registered_by_a_later_run_is_carried_on_not_dropped(tmp_path):
    model, trainer = _trainer(tmp_path, state={"counter": {"n": 7}})
    _train(model, trainer, 2)
    model, second = _trainer(tmp_path)          # registers nothing
    _train(model, second, 4)
    counter = {"n": 0}
    _trainer(tmp_path, state={"counter": counter})
    assert counter == {"n": 7}


@pytest.mark.parametrize("obj, words", [
    (0.5, "user state 'bad' is a float, which the runtime cannot restore in place"),
    ("run-17", "user state 'bad' is a str"),
    ({"fn": lambda: 0}, "user state 'bad'['fn'] is a function"),
    ([1, {"x": object()}], "user state 'bad'[1]['x'] is a object"),
    (object(), "user state 'bad' is a object"),
])
def test_what_cannot_be_restored_in_place_is_refused_at_registration(tmp_path, obj, words):
    _, trainer = _trainer(tmp_path)
    with pytest.raises(RuntimeSetupError, match=words.replace("[", r"\[").replace("]", r"\]")):
        trainer.register_state("bad", obj)


def test_a_name_registered_twice_is_refused(tmp_path):
    _, trainer = _trainer(tmp_path, state={"best": {}})
    with pytest.raises(RuntimeSetupError, match="user state 'best' is already registered"):
        trainer.register_state("best", {})
