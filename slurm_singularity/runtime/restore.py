"""Does a checkpoint fit the run that restores it?

A checkpoint records the choices of the run that wrote it: the state's
format, the logical world size ``W``, the per-rank batch size, the buffer
policy, whether an LR scheduler was saved, and one entry per logical rank.
A run that restores it must make the same choices, or it would resume a
different training (another batch size) or fail half-way through loading
(a BROADCAST checkpoint has no per-rank buffers: ``KeyError: 'buffers'``).
So every such field is checked here, before anything is loaded, and a
mismatch is refused with both values and the field's name. Pure: the state
comes in as a dict, the run's choices as a ``RunChoices``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from slurm_singularity.runtime.api import BufferPolicy, RuntimeSetupError

#: Keys every restorable state has (``Trainer.state``).
REQUIRED_KEYS = ("format", "step", "world_size", "batch_size", "buffer_policy", "model",
                 "optimizer", "scheduler", "shared_rng", "ranks")


@dataclass(frozen=True)
class RunChoices:
    """What the restoring run asks for; each must equal what the checkpoint recorded."""

    format: int
    """Trainer state format this runtime reads (``splice.FORMAT``)."""
    world_size: int
    """Logical ranks ``W`` of the job."""
    batch_size: int
    """Samples per logical rank and step."""
    buffer_policy: BufferPolicy
    """How module buffers follow the logical ranks."""
    has_scheduler: bool
    """Whether the run passes an LR scheduler to the trainer."""
    logical_ranks: range
    """The logical ranks this worker runs; each needs its entry in the checkpoint."""
    buffer_count: int
    """Module buffers of the model; PER_RANK checkpoints hold that many per rank."""
    optimizer_names: tuple[str, ...] | None = None
    """Names of the optimizers when the trainer has several (a dict); None for one."""
    scheduler_names: frozenset[str] = frozenset()
    """With several optimizers: the names of those that have an LR scheduler."""
    has_scaler: bool = False
    """Whether the run passes a GradScaler (its scale must continue)."""
    accumulate: int = 1
    """Micro-batches per logical rank and step (gradient accumulation)."""


def check_fits(state: Mapping[str, Any], run: RunChoices, *, step: int, where: Path) -> None:
    """Refuse a checkpoint state that the run cannot resume exactly.

    :raises RuntimeSetupError: names the field, the checkpoint's value and
        the run's, and the checkpoint (step and directory).
    """
    what = f"checkpoint of step {step} in {where}"
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise RuntimeSetupError(f"{what} lacks field(s) {', '.join(missing)}: not a trainer "
                                f"state this runtime wrote")
    if state["format"] != run.format:
        raise RuntimeSetupError(f"{what} has state format {state['format']!r}; this runtime "
                                f"reads format {run.format}")
    if state["world_size"] != run.world_size:
        raise RuntimeSetupError(f"{what} belongs to a job with world size "
                                f"W={state['world_size']}, this job has W={run.world_size}")
    if state["batch_size"] != run.batch_size:
        raise RuntimeSetupError(f"{what} used batch_size={state['batch_size']}, this run asks "
                                f"for {run.batch_size}")
    if state.get("accumulate", 1) != run.accumulate:
        raise RuntimeSetupError(f"{what} used accumulate={state.get('accumulate', 1)}, this "
                                f"run asks for {run.accumulate}")
    saved_policy = _buffer_policy(state["buffer_policy"])
    if saved_policy is not run.buffer_policy:
        raise RuntimeSetupError(
            f"{what} was saved with buffers={_name(saved_policy, state['buffer_policy'])}, "
            f"this run asks for buffers=BufferPolicy.{run.buffer_policy.name}: restore it "
            f"with the buffer policy it was saved with")
    _check_optimizers(state, run, what)
    saved_scaler = state.get("scaler") is not None
    if saved_scaler != run.has_scaler:
        raise RuntimeSetupError(
            f"{what} {'holds' if saved_scaler else 'has no'} GradScaler state, this run "
            f"{'passes' if run.has_scaler else 'passes no'} scaler: the loss scale would not "
            f"continue where it stopped")
    saved_scheduler = state["scheduler"] is not None
    if run.optimizer_names is None and saved_scheduler != run.has_scheduler:
        raise RuntimeSetupError(
            f"{what} {'holds' if saved_scheduler else 'has no'} LR scheduler state, this run "
            f"{'passes' if run.has_scheduler else 'passes no'} scheduler: the learning rate "
            f"would not continue where it stopped")
    _check_ranks(state["ranks"], run, what)


def _check_optimizers(state: Mapping[str, Any], run: RunChoices, what: str) -> None:
    raw = state.get("optimizer_names")
    saved = tuple(raw) if isinstance(raw, list) else None
    if saved != run.optimizer_names:
        def say(names: tuple[str, ...] | None) -> str:
            return "one optimizer" if names is None else f"optimizers {', '.join(names)}"
        raise RuntimeSetupError(f"{what} was saved with {say(saved)}, this run has "
                                f"{say(run.optimizer_names)}")
    if run.optimizer_names is None:
        return
    scheds = state["scheduler"]
    saved_scheds = frozenset(scheds) if isinstance(scheds, dict) else frozenset()
    if saved_scheds != run.scheduler_names:
        raise RuntimeSetupError(
            f"{what} holds LR scheduler state for optimizers "
            f"{sorted(saved_scheds) or 'none'}, this run passes schedulers for "
            f"{sorted(run.scheduler_names) or 'none'}: the learning rate would not continue "
            f"where it stopped")


def _buffer_policy(value: object) -> BufferPolicy | None:
    try:
        return BufferPolicy(value)
    except ValueError:
        return None


def _name(policy: BufferPolicy | None, raw: object) -> str:
    return f"BufferPolicy.{policy.name}" if policy is not None else f"{raw!r} (unknown)"


def _check_ranks(ranks: object, run: RunChoices, what: str) -> None:
    if not isinstance(ranks, list) or not all(isinstance(e, dict) and "rank" in e
                                              for e in ranks):
        raise RuntimeSetupError(f"{what}: field ranks is not a list of per-rank entries")
    by_rank = {e["rank"]: e for e in ranks}
    absent = [r for r in run.logical_ranks if r not in by_rank]
    if absent:
        raise RuntimeSetupError(f"{what}: field ranks lacks logical rank(s) "
                                f"{', '.join(map(str, absent))} of this worker")
    for r in run.logical_ranks:
        entry = by_rank[r]
        for key in ("rng", "cursor"):
            if key not in entry:
                raise RuntimeSetupError(f"{what}: logical rank {r} lacks field {key}")
        if run.buffer_policy is BufferPolicy.PER_RANK:
            buffers = entry.get("buffers")
            if not isinstance(buffers, list) or len(buffers) != run.buffer_count:
                have = len(buffers) if isinstance(buffers, list) else "no"
                raise RuntimeSetupError(
                    f"{what}: logical rank {r} has {have} buffers, this model has "
                    f"{run.buffer_count}")
