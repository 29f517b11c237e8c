"""The optimizers of a trainer: one, or several by name (a GAN's generator
and discriminator), each with its LR scheduler and its gradient reduction.

Why phases: a GAN steps its discriminator, then computes the generator's
loss through the *updated* discriminator and steps the generator, all in one
training step. So each optimizer is applied at the end of its own pass over
the logical ranks (``step.batches("d")``, then ``step.batches("g")``), not
once at the end of the step, and each pass reduces only its optimizer's
parameters (the generator's loss also leaves gradients in the
discriminator, which its next pass clears, as ``zero_grad`` would).

A ``torch.amp.GradScaler`` is shared by the passes of a step, as in
PyTorch's AMP recipe for several optimizers: each pass unscales and steps
its optimizer through the scaler (skipped when a gradient is inf or NaN);
``scaler.update()`` runs once when the step ends. The inf/NaN check needs no
collective of its own: it looks at the reduced gradients, which are the
same bits on every device in deterministic mode, so every device skips the
same steps and moves its scale alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from slurm_singularity.runtime.api import JobShape, RuntimeSetupError
from slurm_singularity.runtime.reduce import GradReducer


def _is_optimizer(obj: Any) -> bool:
    return all(callable(getattr(obj, a, None)) for a in ("step", "state_dict",
                                                         "load_state_dict")) \
        and isinstance(getattr(obj, "param_groups", None), list)


def _is_scheduler(obj: Any) -> bool:
    return all(callable(getattr(obj, a, None)) for a in ("step", "state_dict",
                                                         "load_state_dict"))


@dataclass
class Phase:
    """One optimizer, the parameters it steps, their reducer and its scheduler."""

    name: str | None        # None: the trainer's only optimizer, given unnamed
    optimizer: Any
    scheduler: Any
    params: list[torch.nn.Parameter]
    reducer: GradReducer

    def apply(self, scaler: Any, grad_clip: float | None) -> None:
        """After a full pass: reduce, (unscale, clip,) step, schedule."""
        self.reducer.finish()
        if scaler is not None:
            if grad_clip is not None:
                scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, grad_clip)
            scaler.step(self.optimizer)
        else:
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, grad_clip)
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    @property
    def label(self) -> str:
        return "the optimizer" if self.name is None else f"optimizer {self.name!r}"


def build(model: torch.nn.Module, optimizer: Any, scheduler: Any, shape: JobShape,
          deterministic: bool, accumulate: int = 1) -> dict[str | None, Phase]:
    """The phases of a trainer, by name (``None`` for one unnamed optimizer).

    :raises RuntimeSetupError: names the option and what was passed: an
        optimizer that is not one, a scheduler without its optimizer, a
        parameter in two optimizers, a parameter not in the model.
    """
    def reducer(params: list[torch.nn.Parameter]) -> GradReducer:
        return GradReducer(params, world_size=shape.world_size, devices=shape.devices,
                           splice=shape.splice, deterministic=deterministic,
                           accumulate=accumulate)

    if _is_optimizer(optimizer):
        if scheduler is not None and not _is_scheduler(scheduler):
            raise RuntimeSetupError(f"scheduler={type(scheduler).__name__} is not an LR "
                                    f"scheduler (state_dict, load_state_dict, step)")
        params = [p for p in model.parameters() if p.requires_grad]
        return {None: Phase(None, optimizer, scheduler, params, reducer(params))}
    if not isinstance(optimizer, Mapping) or not optimizer:
        raise RuntimeSetupError(
            f"optimizer={type(optimizer).__name__} is neither a torch optimizer nor a "
            f"non-empty dict of them by name (e.g. {{'g': opt_g, 'd': opt_d}})")
    schedulers = _schedulers(scheduler, optimizer)
    in_model = {id(p) for p in model.parameters()}
    owner: dict[int, str] = {}
    phases: dict[str | None, Phase] = {}
    for name, opt in optimizer.items():
        if not isinstance(name, str) or not name:
            raise RuntimeSetupError(f"optimizer name {name!r} must be a non-empty string")
        if not _is_optimizer(opt):
            raise RuntimeSetupError(f"optimizer[{name!r}] is a {type(opt).__name__}, not a "
                                    f"torch optimizer")
        params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        for p in params:
            if id(p) in owner:
                raise RuntimeSetupError(f"a parameter of shape {tuple(p.shape)} is in "
                                        f"optimizer[{owner[id(p)]!r}] and optimizer[{name!r}]: "
                                        f"each parameter belongs to one optimizer")
            if id(p) not in in_model:
                raise RuntimeSetupError(f"optimizer[{name!r}] holds a parameter of shape "
                                        f"{tuple(p.shape)} that is not in the model")
            owner[id(p)] = name
        phases[name] = Phase(name, opt, schedulers.get(name), params, reducer(params))
    return phases


def _schedulers(scheduler: Any, optimizers: Mapping[str, Any]) -> dict[str, Any]:
    if scheduler is None:
        return {}
    if not isinstance(scheduler, Mapping):
        raise RuntimeSetupError(
            f"scheduler={type(scheduler).__name__}: with several optimizers pass the "
            f"schedulers as a dict by optimizer name (e.g. {{'g': sched_g}})")
    for name, sched in scheduler.items():
        if name not in optimizers:
            raise RuntimeSetupError(f"scheduler[{name!r}] has no optimizer of that name "
                                    f"(optimizers: {', '.join(map(repr, optimizers))})")
        if not _is_scheduler(sched):
            raise RuntimeSetupError(f"scheduler[{name!r}] is a {type(sched).__name__}, not "
                                    f"an LR scheduler")
    return dict(scheduler)


def check_scaler(scaler: Any) -> None:
    """:raises RuntimeSetupError: ``scaler`` is not a GradScaler-like object."""
    if scaler is None:
        return
    needed = ("scale", "unscale_", "step", "update", "state_dict", "load_state_dict")
    if not all(callable(getattr(scaler, a, None)) for a in needed):
        raise RuntimeSetupError(f"scaler={type(scaler).__name__} is not a "
                                f"torch.amp.GradScaler ({', '.join(needed)})")


def optimizer_state(phases: dict[str | None, Phase]) -> tuple[Any, Any, list[str] | None]:
    """(optimizer, scheduler, optimizer names) as a checkpoint holds them:
    one optimizer's state as before; several as dicts by name."""
    if None in phases:
        phase = phases[None]
        sched = phase.scheduler.state_dict() if phase.scheduler is not None else None
        return phase.optimizer.state_dict(), sched, None
    opts = {n: ph.optimizer.state_dict() for n, ph in phases.items()}
    scheds = {n: ph.scheduler.state_dict() for n, ph in phases.items()
              if ph.scheduler is not None}
    return opts, scheds or None, [n for n in phases if n is not None]


def load_optimizer_state(phases: dict[str | None, Phase], optimizer: Any,
                         scheduler: Any) -> None:
    """The inverse of ``optimizer_state`` (the checkpoint fits: ``restore.check_fits``).

    :raises RuntimeError, ValueError, KeyError: from torch, a state that
        does not fit an optimizer.
    """
    if None in phases:
        phase = phases[None]
        phase.optimizer.load_state_dict(optimizer)
        if phase.scheduler is not None:
            phase.scheduler.load_state_dict(scheduler)
        return
    for name, phase in phases.items():
        phase.optimizer.load_state_dict(optimizer[name])
        if phase.scheduler is not None:
            phase.scheduler.load_state_dict(scheduler[name])
