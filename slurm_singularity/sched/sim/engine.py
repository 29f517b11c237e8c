"""The event-driven core of the simulator: jobs' progress, events, metrics.

A scheduler (``schedulers.py``) decides; this engine keeps time and applies
its decisions through one method, :meth:`Engine.resize`, which implements the
job model of ``constants.py``: with D of its W devices a job progresses at
``D/W`` of its full rate, divided by ``SPLICE_OVERHEAD`` when ``D < W``; a
resize or a restart after a checkpointed preemption costs
``CHECKPOINT_S + RESTORE_S`` seconds without progress; a preemption that
requeues without a checkpoint (Slurm) throws the job's work away and counts
it as lost GPU time.

Events are arrivals, completions and the wake-ups a scheduler asks for; the
scheduler runs once per distinct event time (or per ``COALESCE_S`` bucket).
"""

from __future__ import annotations

import heapq
import logging
import math
from typing import Callable, Protocol

from ...policy.api import Tier
from .constants import CHECKPOINT_S, COALESCE_S, RESTORE_S, SAMPLE_EVERY_S, SPLICE_OVERHEAD
from .trace import TraceJob

log = logging.getLogger(__name__)


class SimJob:
    """A trace job's life in the simulation (mutable; the engine owns it)."""

    __slots__ = ("job_id", "submit", "work_total", "world_size", "min_devices", "max_devices",
                 "tier", "account", "devices", "work", "last", "stall_until", "rate",
                 "first_start", "end", "version", "preemptions", "resizes", "run_start",
                 "lost_gpu_s", "overhead_gpu_s", "restore_due", "attained_gpu_s", "view",
                 "placement")

    def __init__(self, tj: TraceJob) -> None:
        self.job_id = tj.job_id
        self.submit = tj.submit_s
        self.work_total = tj.duration_s
        self.world_size = tj.world_size
        self.min_devices = tj.min_devices or tj.world_size
        self.max_devices = tj.max_devices or tj.world_size
        self.tier: Tier = tj.tier or Tier.STANDARD
        self.account = tj.account
        self.devices = 0
        self.work = 0.0
        self.last = tj.submit_s
        self.stall_until = 0.0
        self.rate = 0.0
        self.first_start: float | None = None
        self.end: float | None = None
        self.version = 0
        self.preemptions = 0
        self.resizes = 0
        self.run_start = 0.0
        self.lost_gpu_s = 0.0
        self.overhead_gpu_s = 0.0
        self.restore_due = 0.0
        self.attained_gpu_s = 0.0
        self.view = None          # the planner's JobState, kept by the singularity scheduler
        self.placement: tuple[tuple[str, int], ...] = ()

    def advance(self, now: float) -> None:
        """Bring ``work`` and ``attained_gpu_s`` up to ``now``."""
        if self.devices:
            self.attained_gpu_s += self.devices * (now - self.last)
            start = max(self.last, self.stall_until)
            if now > start:
                self.work = min(self.work_total, self.work + self.rate * (now - start))
        self.last = now

    def finish_time(self) -> float:
        left = max(0.0, self.work_total - self.work)
        return max(self.last, self.stall_until) + left / self.rate


class Scheduler(Protocol):
    """What the engine asks of a scheduler."""

    name: str

    def attach(self, engine: "Engine") -> None: ...
    def on_arrival(self, job: SimJob, now: float) -> None: ...
    def on_finish(self, job: SimJob, now: float) -> None: ...
    def schedule(self, now: float) -> float | None:
        """Decide at ``now`` (calling ``engine.resize``); return a wake-up time or None."""


class Engine:
    """Runs one trace through one scheduler on ``total_gpus`` GPUs."""

    def __init__(self, jobs: list[TraceJob], total_gpus: int, scheduler: Scheduler,
                 progress: Callable[[int], None] | None = None) -> None:
        self.trace = jobs
        self.total_gpus = total_gpus
        self.scheduler = scheduler
        self.progress = progress
        self.active: dict[int, SimJob] = {}
        self.done: list[SimJob] = []
        self.busy = 0
        self.pending = 0
        self.account_busy: dict[str, int] = {}
        self._events: list[tuple[float, int, int, int]] = []   # (time, seq, job_id or -1, version)
        self._seq = 0
        self.samples: list[tuple[float, int, int, dict[str, int]]] = []
        self.busy_gpu_s = 0.0
        self._busy_since = 0.0
        self.now = 0.0

    # -- what schedulers call ---------------------------------------------

    def resize(self, job: SimJob, now: float, devices: int, *, checkpoint: bool = True) -> None:
        """Give ``job`` ``devices`` GPUs now (0 = preempt). ``checkpoint=False``
        preempts by requeue without a checkpoint: the work done is lost."""
        job.advance(now)
        old = job.devices
        if devices == old:
            return
        self._account(now, job.account, devices - old)
        stall = 0.0
        if devices == 0:
            job.preemptions += 1
            self.pending += 1
            if checkpoint:
                job.restore_due = CHECKPOINT_S + RESTORE_S
                job.overhead_gpu_s += old * CHECKPOINT_S
            else:
                job.lost_gpu_s += old * (now - job.run_start)
                job.work = 0.0
                job.restore_due = 0.0
        elif old == 0:
            self.pending -= 1
            if job.first_start is None:
                job.first_start = now
            job.run_start = now
            stall = job.restore_due
            job.restore_due = 0.0
        else:
            job.resizes += 1
            stall = CHECKPOINT_S + RESTORE_S
        job.overhead_gpu_s += devices * stall
        job.stall_until = now + stall
        job.devices = devices
        job.rate = devices / job.world_size / (1.0 if devices >= job.world_size else SPLICE_OVERHEAD)
        job.version += 1
        if devices:
            self._push(job.finish_time(), job.job_id, job.version)

    def _account(self, now: float, account: str, delta: int) -> None:
        self.busy_gpu_s += self.busy * (now - self._busy_since)
        self._busy_since = now
        if delta:
            self.busy += delta
            self.account_busy[account] = self.account_busy.get(account, 0) + delta
        if self.busy > self.total_gpus:
            raise RuntimeError(f"{self.scheduler.name}: {self.busy} GPUs busy of {self.total_gpus}")

    def _push(self, t: float, job_id: int, version: int) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, job_id, version))

    # -- the loop -----------------------------------------------------------

    def run(self) -> list[SimJob]:
        sched = self.scheduler
        sched.attach(self)
        trace = self.trace
        n = len(trace)
        i = 0
        events = self._events
        next_sample = 0.0
        last_wake = None
        active = self.active
        while i < n or events:
            while events and events[0][2] >= 0 and (
                    events[0][2] not in active or active[events[0][2]].version != events[0][3]):
                heapq.heappop(events)             # a completion made stale by a resize
            if i >= n and (not events or not active):
                break                             # only stale wake-ups are left
            t = trace[i].submit_s if i < n else float("inf")
            if events and events[0][0] < t:
                t = events[0][0]
            horizon = t + COALESCE_S
            if next_sample <= t:
                # Nothing changes between two events: of the samples due in
                # between, keep the first and the last (the plots draw the
                # same lines), so a long idle stretch costs two samples.
                due = math.floor((t - next_sample) / SAMPLE_EVERY_S)
                self._sample(next_sample)
                if due:
                    self._sample(next_sample + due * SAMPLE_EVERY_S)
                next_sample += (due + 1) * SAMPLE_EVERY_S
            self.now = t
            while events and events[0][0] <= horizon:
                et, _, job_id, version = heapq.heappop(events)
                job = self.active.get(job_id)
                if job is None or job.version != version:
                    continue                      # a wake-up, or a stale completion
                job.advance(et)
                job.work = job.work_total
                job.end = et
                self._account(et, job.account, -job.devices)
                job.devices = 0
                del self.active[job_id]
                self.done.append(job)
                sched.on_finish(job, et)
            start = i
            while i < n and trace[i].submit_s <= horizon:
                job = SimJob(trace[i])
                self.active[job.job_id] = job
                self.pending += 1
                sched.on_arrival(job, trace[i].submit_s)
                i += 1
            if self.progress and i > start:
                self.progress(i - start)
            wake = sched.schedule(t)
            if wake is not None and wake != last_wake and wake > t:
                self._push(wake, -1, 0)
                last_wake = wake
        self._account(self.now, "", 0)
        self._sample(self.now)
        return self.done

    def _sample(self, t: float) -> None:
        self.samples.append((t, self.busy, self.pending, dict(self.account_busy)))
