"""Training state that outlives its worker: the model's tensors, the
optimizer's state and the step counter, named in the proxy.

Why: a worker killed with SIGKILL and restarted should continue from what is
on the device, without reading a checkpoint from disk. The model's
parameters and the optimizer's state already live in the proxy; naming them
there (once per step, inside :meth:`ProxyDevice.atomic` together with the
optimizer's update and the new step number) makes the step's update all or
nothing, so a re-attached worker finds exactly the state after the last
completed step, and the job's random stream as it was then.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from slurm_singularity.proxy.client import ProxyDevice


def _step_key(prefix: str) -> str:
    return f"{prefix}.step"


def commit_step(dev: ProxyDevice, model: nn.Module, opt: torch.optim.Optimizer, step: int,
                prefix: str = "train") -> None:
    """Name the model's tensors and the optimizer's state in the proxy and
    record ``step`` as the number of completed steps. Call it inside
    ``dev.atomic()``, after ``opt.step()``."""
    for name, t in model.state_dict(keep_vars=True).items():
        dev.register(f"{prefix}.model.{name}", t)
    for idx, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                dev.register(f"{prefix}.opt.{idx}.{key}", value)
    dev.set_meta(_step_key(prefix), int(step))


def completed_steps(dev: ProxyDevice, prefix: str = "train") -> int | None:
    """Steps the job completed according to the proxy; None for a new job."""
    value = dev.get_meta(_step_key(prefix))
    return value if isinstance(value, int) else None


def resume(dev: ProxyDevice, model: nn.Module,
           make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
           prefix: str = "train") -> tuple[torch.optim.Optimizer, int]:
    """Point ``model`` at the tensors the proxy keeps for this job (no copy,
    no disk) and rebuild its optimizer with the kept state.

    :raises RemoteError: the proxy lacks a tensor the model needs.
    :raises ValueError: the job has no completed step in this proxy.
    """
    step = completed_steps(dev, prefix)
    if step is None:
        raise ValueError(f"job {dev.job} has no '{_step_key(prefix)}' in its proxy")
    state = {name: dev.lookup(f"{prefix}.model.{name}") for name in model.state_dict()}
    model.load_state_dict(state, assign=True)
    opt = make_optimizer(model)
    saved = opt.state_dict()
    head = f"{prefix}.opt."
    names = dev.names_at_attach
    for full in names:
        if full.startswith(head):
            idx, key = full[len(head):].split(".", 1)
            saved["state"].setdefault(int(idx), {})[key] = dev.lookup(full)
    opt.load_state_dict(saved)
    return opt, step
