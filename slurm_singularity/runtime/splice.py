"""Replica splicing: ``k = W / D`` logical ranks run one after another on a
device inside every step, with checkpoint, restore and preemption.

Why this shape: parameters and optimizer state exist once per device by
construction (one model, one optimizer per worker process), and each logical
rank has what it would have under DDP and nothing more: its micro-batch (its
own data shard and cursor), its RNG stream (a torch generator state swapped
in for its turn) and, with ``BufferPolicy.PER_RANK``, its buffers (tensor
references swapped, never copied). Only one rank's activations are alive at
a time, so each may use the whole device memory. The per-turn overhead is a
few pointer swaps and two RNG-state copies, which is why splicing costs what
gradient accumulation costs.

The user's loop::

    for step in trainer.steps(total):
        for x, y in step.batches():     # k turns, one per logical rank
            loss_fn(model(x), y).backward()

After each step the trainer reduces the gradients (``reduce.GradReducer``),
steps the optimizer and scheduler, agrees with the other devices on whether
to stop (one all-reduce of the preemption flag), and checkpoints when asked,
every ``ckpt_every`` steps, every ``SINGULARITY_CKPT_EVERY_S`` seconds and at
the end. On preemption it writes one replica's state and exits with
``contract.REQUEUE_EXIT_CODE``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from slurm_singularity import contract
from slurm_singularity.runtime import checkpoint, loader, metrics
from slurm_singularity.runtime.api import (
    BufferPolicy, CheckpointReason, RuntimeSetupError, StopReason,
)
from slurm_singularity.runtime.data import Cursor
from slurm_singularity.runtime.history import RunProgress, record_run
from slurm_singularity.runtime.job import Job
from slurm_singularity.runtime.reduce import GradReducer
from slurm_singularity.runtime.restore import RunChoices, check_fits

log = logging.getLogger(__name__)

FORMAT = 1


def params_sha256(model: torch.nn.Module) -> str:
    """sha256 of all parameters' bytes in ``named_parameters`` order."""
    digest = hashlib.sha256()
    for _, p in model.named_parameters():
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def rank_seed(seed: int, rank: int) -> int:
    """Seed of logical rank ``rank``'s RNG stream (independent of D)."""
    return (seed * 1_000_003 + 7_919 * (rank + 1)) % (2**63)


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
            self.local = RunProgress(job.shape.devices, job.shape.world_size)
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
    """One training step on this device; iterate ``batches()`` in full."""

    def __init__(self, trainer: "Trainer", index: int) -> None:
        self.trainer = trainer
        self.index = index          # steps completed before this one
        self.rank: int | None = None  # logical rank whose turn it is
        self.turns = 0
        self._metrics = metrics.StepMetrics(trainer.job.shape.logical_ranks)

    def batches(self) -> Iterator[Any]:
        """One micro-batch per logical rank of this device, in rank order;
        between two yields the trainer swaps the rank's RNG state and
        buffers and collects its gradient."""
        t = self.trainer
        for turn, rank in enumerate(t.job.shape.logical_ranks):
            self.rank = rank
            t._begin_turn(turn, rank)
            yield _to_device(t.shards[rank].next_batch(), t.job.device)
            t._end_turn(turn, rank)
            self.turns += 1
        self.rank = None

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

    Options: ``scheduler`` (an LR scheduler stepped once per step), ``seed``
    (data order and the logical ranks' RNG streams), ``shuffle``,
    ``collate``, ``buffers`` (a ``BufferPolicy``), ``ckpt_every`` (steps),
    ``grad_clip`` (max gradient norm after reduction).

    :raises RuntimeSetupError: the checkpoint belongs to a job of another
        shape, or bad options.
    :raises CheckpointError: checkpoints exist but none verifies.
    """

    def __init__(self, job: Job, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 dataset: Any, *, batch_size: int, scheduler: Any = None, seed: int = 0,
                 shuffle: bool = True, collate: Callable[[list[Any]], Any] = default_collate,
                 buffers: BufferPolicy = BufferPolicy.BROADCAST, ckpt_every: int | None = None,
                 grad_clip: float | None = None) -> None:
        if batch_size < 1:
            raise RuntimeSetupError(f"batch_size={batch_size} must be at least 1")
        if ckpt_every is not None and ckpt_every < 1:
            raise RuntimeSetupError(f"ckpt_every={ckpt_every} must be at least 1 step")
        if not isinstance(buffers, BufferPolicy):
            raise RuntimeSetupError(f"buffers={buffers!r} is not a BufferPolicy")
        self.job, self.model, self.optimizer, self.scheduler = job, model, optimizer, scheduler
        self.batch_size, self.seed = batch_size, seed
        self.buffer_policy, self.ckpt_every, self.grad_clip = buffers, ckpt_every, grad_clip
        shape = job.shape
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.reducer = GradReducer(self.params, world_size=shape.world_size,
                                   devices=shape.devices, splice=shape.splice,
                                   deterministic=job.deterministic)
        self.shards = self._data_sources(dataset, batch_size, seed=seed, shuffle=shuffle,
                                         collate=collate)
        self.rng: dict[int, dict[str, torch.Tensor]] = {}
        for r in shape.logical_ranks:
            gen = torch.Generator()
            gen.manual_seed(rank_seed(seed, r))
            self.rng[r] = {"cpu": gen.get_state()}
            if job.device.type == "cuda":
                cuda_gen = torch.Generator(device=job.device)
                cuda_gen.manual_seed(rank_seed(seed, r))
                self.rng[r]["cuda"] = cuda_gen.get_state()
        self._buffer_slots = [(mod, name) for mod in model.modules()
                              for name, b in mod._buffers.items() if b is not None]
        self.rank_buffers: dict[int, list[torch.Tensor]] = {}
        if buffers is BufferPolicy.PER_RANK:
            self.rank_buffers = {r: [mod._buffers[n].clone() for mod, n in self._buffer_slots]
                                 for r in shape.logical_ranks}
        self._step_start_buffers: list[torch.Tensor] = []
        self._rank0_buffers: list[torch.Tensor] | None = None
        self._shared_rng: dict[str, torch.Tensor] = {}
        self.step = 0
        self.last_ckpt_step: int | None = None
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

    # ---- turns -------------------------------------------------------------
    def _begin_turn(self, turn: int, rank: int) -> None:
        if turn == 0:
            self._shared_rng = self._rng_state()
            self.reducer.begin_step()
            if self.buffer_policy is BufferPolicy.BROADCAST and self._buffer_slots:
                if self.job.shape.splice > 1:
                    self._step_start_buffers = [b.clone() for b in self._model_buffers()]
        elif self.buffer_policy is BufferPolicy.BROADCAST:
            for b, start in zip(self._model_buffers(), self._step_start_buffers):
                b.copy_(start)
        if self.buffer_policy is BufferPolicy.PER_RANK:
            for (mod, name), b in zip(self._buffer_slots, self.rank_buffers[rank]):
                mod._buffers[name] = b
        self._set_rng(self.rng[rank])

    def _end_turn(self, turn: int, rank: int) -> None:
        self.rng[rank] = self._rng_state()
        self.reducer.end_turn(turn)
        if rank == 0 and self.buffer_policy is BufferPolicy.BROADCAST and self._buffer_slots:
            self._rank0_buffers = [b.clone() for b in self._model_buffers()]

    def _model_buffers(self) -> list[torch.Tensor]:
        return [mod._buffers[name] for mod, name in self._buffer_slots]

    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.job.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.job.device)
        return state

    def _set_rng(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.job.device)

    # ---- end of step ---------------------------------------------------------
    def _finish_step(self, step: Step) -> None:
        if step.turns != self.job.shape.splice:
            raise RuntimeError(
                f"step {step.index}: the loop body ran {step.turns} of "
                f"{self.job.shape.splice} logical ranks; iterate step.batches() to the end")
        self._set_rng(self._shared_rng)
        self.reducer.finish()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self._finish_buffers()
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

    def _agree(self) -> tuple[bool, bool]:
        """(preempt, time-due): the same answer on every device."""
        due = (self.job.is_main and self.job.ckpt_every_s is not None
               and time.monotonic() - self._last_ckpt_time >= self.job.ckpt_every_s)
        flags = [int(self.job.preempt.requested), int(due)]
        if self.job.distributed:
            t = torch.tensor(flags, dtype=torch.int32, device=self._collective_device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flags = [int(v) for v in t.tolist()]
        return bool(flags[0]), bool(flags[1])

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
        exits the process with ``contract.REQUEUE_EXIT_CODE``."""
        if total < 0:
            raise RuntimeSetupError(f"total steps {total} is negative")
        self._progress.report(f"start {self.step}")
        try:
            while self.step < total:
                step = Step(self, self.step)
                yield step
                self._finish_step(step)
                self._progress.report(f"step {self.step}")
                preempt, due = self._agree()
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

    # ---- checkpoint ------------------------------------------------------------
    def _rank_states(self) -> list[dict[str, Any]]:
        local = []
        for r in self.job.shape.logical_ranks:
            entry: dict[str, Any] = {"rank": r, "rng": self.rng[r],
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
        return {
            "format": FORMAT, "step": self.step, "world_size": self.job.shape.world_size,
            "batch_size": self.batch_size, "buffer_policy": self.buffer_policy.value,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "shared_rng": self._rng_state(), "ranks": ranks,
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
        check_fits(state, RunChoices(
            format=FORMAT, world_size=shape.world_size, batch_size=self.batch_size,
            buffer_policy=self.buffer_policy, has_scheduler=self.scheduler is not None,
            logical_ranks=shape.logical_ranks, buffer_count=len(self._buffer_slots)),
            step=step, where=self.job.ckpt_dir)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise RuntimeSetupError(f"checkpoint of step {step} in {self.job.ckpt_dir} does "
                                    f"not fit this model or optimizer: {exc}") from exc
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self._set_rng(state["shared_rng"])
        by_rank = {entry["rank"]: entry for entry in state["ranks"]}
        for r in shape.logical_ranks:
            entry = by_rank[r]
            self.rng[r] = entry["rng"]
            self.shards[r].cursor = Cursor.from_list(entry["cursor"])
            if self.buffer_policy is BufferPolicy.PER_RANK:
                self.rank_buffers[r] = [b.to(self.job.device) for b in entry["buffers"]]
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
