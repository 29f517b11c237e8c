"""Replica splicing: ``k = W / D`` logical ranks run one after another on a
device inside every step, with checkpoint, restore and preemption.

Why this shape: parameters and optimizer state exist once per device by
construction (one model, its optimizers, per worker process), and each
logical rank has what it would have under DDP and nothing more: its
micro-batch (its own data shard and cursor), its RNG streams (torch's,
Python's and numpy's generator states swapped in for its turn, see
``rankrng``) and, with ``BufferPolicy.PER_RANK``, its buffers (tensor
references swapped, never copied). Only one rank's activations are alive at
a time, so each may use the whole device memory. The per-turn overhead is a
few pointer swaps and RNG-state copies, which is why splicing costs what
gradient accumulation costs.

The user's loop::

    for step in trainer.steps(total):
        for x, y in step.batches():     # k turns, one per logical rank
            loss_fn(model(x), y).backward()

A pass over the ``k`` turns (``step.batches()``, ``step.ranks()`` without
data, or ``step.optimize(loss_of)`` for an optimizer that takes a closure)
ends by reducing the gradients of its optimizer's parameters
(``reduce.GradReducer``) and stepping that optimizer and its scheduler
(``phases``); with several optimizers each pass names its own. After the
step the devices agree on whether to stop (one all-reduce of the
preemption and stop flags) and checkpoint when asked: every ``ckpt_every``
steps, every ``SINGULARITY_CKPT_EVERY_S`` seconds, at ``trainer.stop()``, at
a ``break`` out of ``steps()`` and at the end. On preemption it writes one
replica's state and exits with ``contract.REQUEUE_EXIT_CODE``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from slurm_singularity import contract
from slurm_singularity.runtime import checkpoint, loader, metrics, phases
from slurm_singularity.runtime.api import (
    BufferPolicy, CheckpointReason, RuntimeSetupError, StopReason,
)
from slurm_singularity.runtime.data import Cursor
from slurm_singularity.runtime.history import RunProgress, record_run
from slurm_singularity.runtime.job import Job
from slurm_singularity.runtime.rankrng import RankRng, rank_seed
from slurm_singularity.runtime.restore import RunChoices, check_fits
from slurm_singularity.runtime.userstate import UserState

log = logging.getLogger(__name__)

FORMAT = 1

__all__ = ["Trainer", "Step", "params_sha256", "rank_seed", "FORMAT"]


def params_sha256(model: torch.nn.Module) -> str:
    """sha256 of all parameters' bytes in ``named_parameters`` order."""
    digest = hashlib.sha256()
    for _, p in model.named_parameters():
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _to_device(obj: Any, device: torch.device) -> Any:
    if device.type == "cpu":
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


class _Progress:
    """Worker 0's report of the run: to singularity-run's pipe when there is
    one, else recorded here and appended to history.jsonl at the end."""

    def __init__(self, job: Job) -> None:
        self.fd = contract.progress_fd() if job.is_main else None
        self.local: RunProgress | None = None
        self.ckpt_dir = job.ckpt_dir
        if job.is_main and self.fd is None and job.ckpt_dir is not None:
            self.local = RunProgress(job.shape.devices, job.shape.world_size, ckpt_dir=job.ckpt_dir)
        self.closed = False

    def report(self, line: str) -> None:
        if self.fd is not None:
            try:
                os.write(self.fd, (line + "\n").encode())
            except OSError:
                self.fd = None
        elif self.local is not None:
            self.local.feed(line)

    def close(self, stop: StopReason, code: int) -> None:
        if self.closed:
            return
        self.closed = True
        if self.local is not None and self.ckpt_dir is not None:
            record_run(self.ckpt_dir, self.local.record(stop, code))


class Step:
    """One training step on this device: one or more passes over its logical
    ranks, each run to the end."""

    def __init__(self, trainer: "Trainer", index: int) -> None:
        self.trainer = trainer
        self.index = index          # steps completed before this one
        self.rank: int | None = None  # logical rank whose turn it is
        self.turns = 0              # turns done in the pass under way
        self.passes = 0             # passes run to the end
        self.partial: str | None = None   # the optimizer of a pass under way
        self._metrics = metrics.StepMetrics(trainer.job.shape.logical_ranks)

    def batches(self, optimizer: str | None = None) -> Iterator[Any]:
        """One micro-batch per logical rank of this device, in rank order;
        between two yields the trainer swaps the rank's RNG state and
        buffers and collects its gradient. At the end of the loop the
        gradients are reduced and the optimizer (``optimizer``: its name,
        when the trainer has several) and its scheduler step."""
        return self.trainer._pass(self, optimizer, data=True)

    def ranks(self, optimizer: str | None = None) -> Iterator[int]:
        """``batches`` without data: yields each logical rank's number (a
        GAN's generator pass that draws only noise, from the rank's RNG)."""
        return self.trainer._pass(self, optimizer, data=False)

    def optimize(self, loss_of: Callable[[Any], torch.Tensor],
                 optimizer: str | None = None) -> float:
        """Step an optimizer that takes a closure (``torch.optim.LBFGS``):
        each evaluation runs ``loss_of(batch)`` and its backward pass for
        every logical rank on the same micro-batches, reduces the gradients
        and returns the mean loss over all W ranks (the same on every D).
        Returns the loss of the first evaluation."""
        return self.trainer._optimize(self, loss_of, optimizer)

    def record(self, name: str, value: Any) -> None:
        """Record this logical rank's value of metric ``name`` (a number or
        one-element tensor) in its turn; see ``reduce``.

        :raises RuntimeSetupError: outside a turn, twice in a turn, or not a number.
        """
        if self.rank is None:
            raise RuntimeSetupError(f"step.record({name!r}, ...) outside a turn: call it "
                                    f"inside the loop over step.batches()")
        try:
            self._metrics.record(name, self.rank, value)
        except ValueError as exc:
            raise RuntimeSetupError(str(exc)) from None

    def reduce(self, name: str, op: "metrics.MetricOp | str" = "mean") -> float:
        """Metric ``name`` reduced over all W logical ranks (``op``: mean,
        sum, max, min), the same bits on every D; call it on every device,
        after the loop over ``step.batches()`` (collective when D > 1).

        :raises RuntimeSetupError: bad op, called before the turns ended, or
            a logical rank of this device did not record the metric.
        """
        try:
            how = metrics.MetricOp.of(op)
            if self.turns != self.trainer.job.shape.splice:
                raise ValueError(f"step.reduce({name!r}) before the loop over "
                                 f"step.batches() ended")
            local = self._metrics.local(name)
        except ValueError as exc:
            raise RuntimeSetupError(str(exc)) from None
        job = self.trainer.job
        values = metrics.all_ranks(local, devices=job.shape.devices,
                                   device=self.trainer._collective_device())
        return metrics.fold(values, how)


class Trainer:
    """Runs the job's steps on this device; see the module docstring.

    ``model`` is a module, or a dict of modules by name (kept as a
    ``ModuleDict``); ``optimizer`` is a torch optimizer, or a dict of them by
    name (each pass names the one it steps). Options: ``scheduler`` (an LR
    scheduler stepped with its optimizer; a dict by optimizer name when
    there are several), ``seed`` (data order and the logical ranks' RNG
    streams), ``shuffle``, ``collate``, ``buffers`` (a ``BufferPolicy``),
    ``ckpt_every`` (steps), ``grad_clip`` (max gradient norm after
    reduction), ``scaler`` (a ``torch.amp.GradScaler``), ``accumulate``
    (micro-batches per logical rank and step: ``step.batches()`` yields that
    many per turn; divide the loss by it, as under DDP), ``state`` (user
    state by name, see ``register_state``).

    :raises RuntimeSetupError: the checkpoint belongs to a job of another
        shape, or bad options (the message names the option).
    :raises CheckpointError: checkpoints exist but none verifies.
    """

    def __init__(self, job: Job, model: torch.nn.Module | Mapping[str, torch.nn.Module],
                 optimizer: Any, dataset: Any, *, batch_size: int, scheduler: Any = None,
                 seed: int = 0, shuffle: bool = True,
                 collate: Callable[[list[Any]], Any] = default_collate,
                 buffers: BufferPolicy = BufferPolicy.BROADCAST, ckpt_every: int | None = None,
                 grad_clip: float | None = None, scaler: Any = None, accumulate: int = 1,
                 state: Mapping[str, Any] | None = None) -> None:
        if batch_size < 1:
            raise RuntimeSetupError(f"batch_size={batch_size} must be at least 1")
        if ckpt_every is not None and ckpt_every < 1:
            raise RuntimeSetupError(f"ckpt_every={ckpt_every} must be at least 1 step")
        if not isinstance(accumulate, int) or accumulate < 1:
            raise RuntimeSetupError(f"accumulate={accumulate!r} must be an int of at least 1 "
                                    f"micro-batch per logical rank and step")
        if not isinstance(buffers, BufferPolicy):
            raise RuntimeSetupError(f"buffers={buffers!r} is not a BufferPolicy")
        if isinstance(model, Mapping):
            model = torch.nn.ModuleDict(dict(model))
        if not isinstance(model, torch.nn.Module):
            raise RuntimeSetupError(f"model={type(model).__name__} is neither a torch module "
                                    f"nor a dict of them by name")
        phases.check_scaler(scaler)
        shape = job.shape
        self.phases = phases.build(model, optimizer, scheduler, shape, job.deterministic,
                                   accumulate)
        self.accumulate = accumulate
        self.job, self.model, self.scaler = job, model, scaler
        first = next(iter(self.phases.values()))
        self.optimizer, self.scheduler = first.optimizer, first.scheduler
        self.batch_size, self.seed = batch_size, seed
        self.buffer_policy, self.ckpt_every, self.grad_clip = buffers, ckpt_every, grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shards = self._data_sources(dataset, batch_size, seed=seed, shuffle=shuffle,
                                         collate=collate)
        self.rng = RankRng(seed, shape.logical_ranks, job.device)
        self._buffer_slots = [(mod, name) for mod in model.modules()
                              for name, b in mod._buffers.items() if b is not None]
        self.rank_buffers: dict[int, list[torch.Tensor]] = {}
        if buffers is BufferPolicy.PER_RANK:
            self.rank_buffers = {r: [mod._buffers[n].clone() for mod, n in self._buffer_slots]
                                 for r in shape.logical_ranks}
        self._step_start_buffers: list[torch.Tensor] = []
        self._rank0_buffers: list[torch.Tensor] | None = None
        self.user = UserState()
        for name, obj in (state or {}).items():
            self.user.register(name, obj)
        self.step = 0
        self.last_ckpt_step: int | None = None
        self._stop_requested = False
        self._last_ckpt_time = time.monotonic()
        self._progress = _Progress(job)
        if not self._restore() and job.distributed:
            self._broadcast_from_device0([p.data for p in model.parameters()])
            self._broadcast_from_device0([b for b in model.buffers()])

    def _data_sources(self, dataset: Any, batch_size: int, *, seed: int, shuffle: bool,
                      collate: Callable[[list[Any]], Any]) -> dict[int, Any]:
        """One source per logical rank of this device (``loader``): a
        map-style dataset, an IterableDataset or a DataLoader over either."""
        pipeline = loader.pipeline_of(dataset, batch_size=batch_size, shuffle=shuffle,
                                      collate=collate)
        return loader.rank_sources(pipeline, self.job.shape, batch_size, seed=seed,
                                   device=self.job.device, job=str(self.job))

    def register_state(self, name: str, obj: Any) -> None:
        """Checkpoint ``obj`` with the job under ``name`` and restore it at
        any D: an object with ``state_dict()``/``load_state_dict()`` (EMA
        weights, a metric), or a dict or list of plain values kept by
        reference (a best metric, a wandb run id, a counter). Registered
        after a restore, it is loaded at once.

        :raises RuntimeSetupError: names ``name`` and the object's type when
            it cannot be restored in place or holds what a checkpoint
            cannot store; a name registered twice.
        """
        self.user.register(name, obj)

    def stop(self) -> None:
        """Stop after the step under way: it is applied, a final checkpoint
        is written and history records the run as ``stopped``; ``steps()``
        then ends. Agreed across devices: one device asking stops all."""
        self._stop_requested = True

    # ---- passes and turns ------------------------------------------------------
    def _phase(self, name: str | None) -> phases.Phase:
        if name in self.phases:
            return self.phases[name]
        if name is None:
            raise RuntimeSetupError(f"this trainer has several optimizers "
                                    f"({', '.join(map(repr, self.phases))}): name the one "
                                    f"this pass steps, e.g. step.batches({next(iter(self.phases))!r})")
        names = "one unnamed optimizer" if None in self.phases else \
            f"optimizers {', '.join(map(repr, self.phases))}"
        raise RuntimeSetupError(f"optimizer {name!r} is not this trainer's ({names})")

    def _pass(self, step: Step, name: str | None, *, data: bool) -> Iterator[Any]:
        phase = self._phase(name)
        if step.partial is not None:
            raise RuntimeError(f"step {step.index}: a pass of {phase.label} started before "
                               f"the pass of {step.partial} ran to the end")
        step.partial, step.turns = phase.label, 0
        self._begin_pass(phase)
        shards, device = self.shards, self.job.device
        for turn, rank in enumerate(self.job.shape.logical_ranks):
            step.rank = rank
            self._begin_turn(turn, rank)
            if data:
                for _ in range(self.accumulate):
                    yield _to_device(shards[rank].next_batch(), device)
            else:
                yield rank
            self._end_turn(turn, rank, phase)
            step.turns += 1
        step.rank = None
        self._end_pass()
        phase.apply(self.scaler, self.grad_clip)
        step.partial = None
        step.passes += 1

    def _optimize(self, step: Step, loss_of: Callable[[Any], torch.Tensor],
                  name: str | None) -> float:
        phase = self._phase(name)
        if self.scaler is not None:
            raise RuntimeSetupError("step.optimize (an optimizer closure) cannot run with "
                                    "scaler=: torch's GradScaler takes no closure")
        if step.partial is not None:
            raise RuntimeError(f"step {step.index}: step.optimize started before the pass "
                               f"of {step.partial} ran to the end")
        ranks = self.job.shape.logical_ranks
        batches: dict[int, Any] = {}

        def closure() -> torch.Tensor:
            losses = []
            self._begin_pass(phase)
            for turn, rank in enumerate(ranks):
                self._begin_turn(turn, rank)
                if rank not in batches:
                    batches[rank] = _to_device(self.shards[rank].next_batch(), self.job.device)
                loss = loss_of(batches[rank])
                loss.backward()
                losses.append(loss.detach().reshape(()))
                self._end_turn(turn, rank, phase)
            self._end_pass()
            phase.reducer.finish()
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(phase.params, self.grad_clip)
            return self._mean_over_ranks(torch.stack(losses))

        step.partial = phase.label
        first = phase.optimizer.step(closure)
        if phase.scheduler is not None:
            phase.scheduler.step()
        step.partial = None
        step.passes += 1
        return float(first)

    def _mean_over_ranks(self, local: torch.Tensor) -> torch.Tensor:
        """The mean of one value per logical rank over all W, folded in rank
        order (the same bits on every D)."""
        values = local
        if self.job.distributed:
            blocks = [torch.empty_like(local) for _ in range(self.job.shape.devices)]
            dist.all_gather(blocks, local)
            values = torch.cat(blocks)
        total = values[0].clone()
        for v in values[1:]:
            total = total + v
        return total / self.job.shape.world_size

    def _begin_pass(self, phase: phases.Phase) -> None:
        self.rng.begin_pass()
        phase.reducer.begin_step()
        if self.buffer_policy is BufferPolicy.BROADCAST and self._buffer_slots:
            if self.job.shape.splice > 1:
                self._step_start_buffers = [b.clone() for b in self._model_buffers()]

    def _begin_turn(self, turn: int, rank: int) -> None:
        if turn and self.buffer_policy is BufferPolicy.BROADCAST:
            for b, start in zip(self._model_buffers(), self._step_start_buffers):
                b.copy_(start)
        if self.buffer_policy is BufferPolicy.PER_RANK:
            for (mod, name), b in zip(self._buffer_slots, self.rank_buffers[rank]):
                mod._buffers[name] = b
        self.rng.begin_turn(rank)

    def _end_turn(self, turn: int, rank: int, phase: phases.Phase) -> None:
        self.rng.end_turn(rank)
        phase.reducer.end_turn(turn)
        if rank == 0 and self.buffer_policy is BufferPolicy.BROADCAST and self._buffer_slots:
            self._rank0_buffers = [b.clone() for b in self._model_buffers()]

    def _end_pass(self) -> None:
        self.rng.end_pass()
        self._finish_buffers()

    def _model_buffers(self) -> list[torch.Tensor]:
        return [mod._buffers[name] for mod, name in self._buffer_slots]

    # ---- end of step ---------------------------------------------------------
    def _finish_step(self, step: Step) -> None:
        k = self.job.shape.splice
        if step.partial is not None:
            raise RuntimeError(
                f"step {step.index}: the loop body ran {step.turns} of {k} logical ranks; "
                f"iterate step.batches() to the end (the pass of {step.partial})")
        if not step.passes:
            raise RuntimeError(f"step {step.index}: the loop body ran no pass over the "
                               f"logical ranks; iterate step.batches() in every step")
        if self.scaler is not None:
            self.scaler.update()
        self.step += 1

    def _finish_buffers(self) -> None:
        if not self._buffer_slots:
            return
        if self.buffer_policy is BufferPolicy.PER_RANK:
            first = self.job.shape.logical_ranks.start
            for (mod, name), b in zip(self._buffer_slots, self.rank_buffers[first]):
                mod._buffers[name] = b
            return
        if self._rank0_buffers is not None:   # device 0 ran logical rank 0
            for b, new in zip(self._model_buffers(), self._rank0_buffers):
                b.copy_(new)
            self._rank0_buffers = None
        if self.job.distributed:
            self._broadcast_from_device0(self._model_buffers())

    def _broadcast_from_device0(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            dist.broadcast(t, src=0)

    def _agree(self) -> tuple[bool, bool, bool]:
        """(preempt, time-due, stop): the same answer on every device."""
        due = (self.job.is_main and self.job.ckpt_every_s is not None
               and time.monotonic() - self._last_ckpt_time >= self.job.ckpt_every_s)
        flags = [int(self.job.preempt.requested), int(due), int(self._stop_requested)]
        if self.job.distributed:
            t = torch.tensor(flags, dtype=torch.int32, device=self._collective_device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flags = [int(v) for v in t.tolist()]
        return bool(flags[0]), bool(flags[1]), bool(flags[2])

    def _collective_device(self) -> torch.device:
        return self.job.device if self.job.device.type == "cuda" else torch.device("cpu")

    # ---- the loop ------------------------------------------------------------
    def _preempted_by(self) -> str:
        signum = self.job.preempt.signum
        if signum is None:
            return "a peer device got the signal"
        try:
            return f"{signal.Signals(signum).name} here"
        except ValueError:
            return f"signal {signum} here"

    def steps(self, total: int) -> Iterator[Step]:
        """Yield a ``Step`` until ``total`` steps are complete (counting
        those restored from a checkpoint). On preemption it checkpoints and
        exits the process with ``contract.REQUEUE_EXIT_CODE``. After
        ``trainer.stop()``, or a ``break`` out of the loop (taken at the same
        step on every device), it applies the step, checkpoints and ends; a
        ``break`` in the middle of ``step.batches()`` cannot apply the step
        and says so."""
        if total < 0:
            raise RuntimeSetupError(f"total steps {total} is negative")
        self._progress.report(f"start {self.step} {total}")
        try:
            while self.step < total:
                step = Step(self, self.step)
                try:
                    yield step
                except GeneratorExit:
                    self._stop_at_break(step)
                    raise
                self._finish_step(step)
                self._progress.report(f"step {self.step}")
                preempt, due, stop = self._agree()
                if stop and self.step < total:
                    self._stop("trainer.stop() or a break on a device")
                    return
                if preempt:
                    self.save(CheckpointReason.PREEMPT)
                    log.warning("%s: preempted (%s); checkpointed step %d, exiting %d",
                                self.job, self._preempted_by(), self.step,
                                contract.REQUEUE_EXIT_CODE)
                    self._progress.close(StopReason.PREEMPTED, contract.REQUEUE_EXIT_CODE)
                    self.job.close()
                    sys.stdout.flush()
                    raise SystemExit(contract.REQUEUE_EXIT_CODE)
                if due or (self.ckpt_every and self.step % self.ckpt_every == 0):
                    self.save(CheckpointReason.PERIODIC)
            if self.last_ckpt_step != self.step:
                self.save(CheckpointReason.FINAL)
            self._progress.close(StopReason.FINISHED, 0)
        finally:
            self._progress.close(StopReason.FAILED, 1)

    def _stop(self, how: str) -> None:
        """End the run early at a step boundary: checkpoint, record ``stopped``."""
        if self.last_ckpt_step != self.step:
            self.save(CheckpointReason.FINAL)
        log.warning("%s: stopped at step %d by %s; checkpointed", self.job, self.step, how)
        self._progress.report(f"stop {self.step}")
        self._progress.close(StopReason.STOPPED, 0)

    def _stop_at_break(self, step: Step) -> None:
        """The loop over ``steps()`` was left (``break``, or an exception in
        its body: Python closes the generator alike) while ``step`` was
        under way. With its passes done, the step is applied and this
        device joins the step boundary's agreement with its stop flag set,
        so devices still in the loop stop at the same step and the
        checkpoint's collectives match; an exception then goes on and the
        run is recorded by its exit code. In the middle of a pass, the
        other devices may wait in that pass's reduction: no collective."""
        if step.partial is None:
            if step.passes:
                self._finish_step(step)
                self._progress.report(f"step {self.step}")
            self._stop_requested = True
            self._agree()
            self._stop("a break out of trainer.steps() (or an exception in the loop body)")
            return
        saved = "no checkpoint" if self.last_ckpt_step is None \
            else f"the checkpoint of step {self.last_ckpt_step}"
        print(f"singularity-run: warning: {self.job}: the loop left step {step.index} in the "
              f"middle of the pass of {step.partial} ({step.turns} of "
              f"{self.job.shape.splice} logical ranks), so that step cannot be applied or "
              f"checkpointed; the run stops with {saved}. Break after the inner loop, or call "
              f"trainer.stop(), to keep every step", file=sys.stderr, flush=True)
        self._progress.report(f"stop {self.step}")
        self._progress.close(StopReason.STOPPED, 0)

    # ---- checkpoint ------------------------------------------------------------
    def _rank_states(self) -> list[dict[str, Any]]:
        local = []
        for r in self.job.shape.logical_ranks:
            entry: dict[str, Any] = {"rank": r, "rng": self.rng.rank_state(r),
                                     "cursor": self.shards[r].cursor.to_list()}
            if self.buffer_policy is BufferPolicy.PER_RANK:
                entry["buffers"] = [b.detach().cpu() for b in self.rank_buffers[r]]
            local.append(entry)
        if not self.job.distributed:
            return local
        gathered: list[Any] = [None] * self.job.shape.devices
        dist.all_gather_object(gathered, local)
        return [entry for block in gathered for entry in block]

    def state(self) -> dict[str, Any]:
        """One replica's state plus every logical rank's small state (RNG,
        data cursor, buffers under PER_RANK); collective when D > 1."""
        ranks = self._rank_states()
        optimizer, scheduler, names = phases.optimizer_state(self.phases)
        return {
            "format": FORMAT, "step": self.step, "world_size": self.job.shape.world_size,
            "batch_size": self.batch_size, "accumulate": self.accumulate,
            "buffer_policy": self.buffer_policy.value,
            "model": self.model.state_dict(), "optimizer": optimizer, "scheduler": scheduler,
            "optimizer_names": names,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "user": self.user.state(),
            "shared_rng": self.rng.portable(self.rng.capture()), "ranks": ranks,
        }

    def save(self, reason: CheckpointReason) -> None:
        """Write a checkpoint of the current step (device 0 writes; every
        device must call it, as it gathers the logical ranks' state)."""
        state = self.state()
        self._last_ckpt_time = time.monotonic()
        if self.job.ckpt_dir is None:
            return
        if self.job.is_main:
            checkpoint.write(self.job.ckpt_dir, self.step, state,
                             devices=self.job.shape.devices,
                             world_size=self.job.shape.world_size, reason=reason)
            self._progress.report(f"ckpt {self.step} {reason.value}")
        self.last_ckpt_step = self.step

    def _restore(self) -> bool:
        if self.job.ckpt_dir is None:
            return False
        found = checkpoint.load_latest(self.job.ckpt_dir)
        if found is None:
            return False
        step, state = found
        shape = self.job.shape
        named = None not in self.phases
        check_fits(state, RunChoices(
            format=FORMAT, world_size=shape.world_size, batch_size=self.batch_size,
            buffer_policy=self.buffer_policy, has_scheduler=self.scheduler is not None,
            logical_ranks=shape.logical_ranks, buffer_count=len(self._buffer_slots),
            optimizer_names=tuple(n for n in self.phases if n is not None) if named else None,
            scheduler_names=frozenset(n for n, ph in self.phases.items()
                                      if n is not None and ph.scheduler is not None),
            has_scaler=self.scaler is not None, accumulate=self.accumulate),
            step=step, where=self.job.ckpt_dir)
        try:
            self.model.load_state_dict(state["model"])
            phases.load_optimizer_state(self.phases, state["optimizer"], state["scheduler"])
            if self.scaler is not None:
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise RuntimeSetupError(f"checkpoint of step {step} in {self.job.ckpt_dir} does "
                                    f"not fit this model or optimizer: {exc}") from exc
        self.rng.apply(state["shared_rng"])
        by_rank = {entry["rank"]: entry for entry in state["ranks"]}
        for r in shape.logical_ranks:
            entry = by_rank[r]
            self.rng.load_rank(r, entry["rng"])
            self.shards[r].cursor = Cursor.from_list(entry["cursor"])
            if self.buffer_policy is BufferPolicy.PER_RANK:
                self.rank_buffers[r] = [b.to(self.job.device) for b in entry["buffers"]]
        self.user.restore(state.get("user"), step)
        self.step = self.last_ckpt_step = int(state["step"])
        log.warning("%s: restored step %d from %s", self.job, self.step, self.job.ckpt_dir)
        return True

    # ---- results -------------------------------------------------------------
    def params_sha256(self) -> str:
        return params_sha256(self.model)

    def buffers_sha256(self) -> str:
        """sha256 of every logical rank's buffers in rank order (PER_RANK)
        or of the one shared set (BROADCAST); collective when D > 1."""
        digest = hashlib.sha256()
        if self.buffer_policy is BufferPolicy.PER_RANK:
            for entry in self._rank_states():
                for b in entry["buffers"]:
                    digest.update(b.contiguous().numpy().tobytes())
        else:
            for b in self._model_buffers():
                digest.update(b.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()
