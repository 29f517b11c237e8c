"""The event-driven core of the simulator: jobs' progress, events, costs, metrics.

A scheduler (``schedulers.py``) decides; this engine keeps time and applies
its decisions through one method, :meth:`Engine.resize`, which charges the
measured costs of ``constants.py`` alike for every scheduler:

- with D of its W devices a job progresses at ``goodput.rate(W, D, f)`` of
  its full rate, ``f`` its own sync fraction (drawn from the run's seed by
  ``goodput.draw_sync_fraction``; 0 for every job with
  ``Costs.scaling = Scaling.LINEAR``, where the rate is ``D/W`` over
  ``splice_overhead(W/D)``); at W it is 1, so rigid schedulers run the
  trace's durations;
- a job that gives GPUs up (preempted or shrunk) keeps them until its
  checkpoint is durable plus the hand-over time; whoever takes them waits
  that long (a job killed without a checkpoint keeps them for the hand-over
  only, and loses the work since its last checkpoint: ``Save``);
- a preemption or resize of a step younger than the scheduler's settle time
  waits for it; a resized job runs again after its checkpoint, the
  scheduler's restart latency and its restore; a restarted one after the
  latency and its restore;
- decisions happen at the scheduler's period: events between two passes are
  handled together at the next multiple of ``Costs.period_s``.

Events are arrivals, completions and the wake-ups a scheduler asks for.
"""

from __future__ import annotations

import enum
import heapq
import logging
import math
from typing import Callable, Protocol

from ...policy.api import Tier
from .. import goodput
from .constants import SAMPLE_EVERY_S, Costs, Scaling
from .trace import TraceJob

log = logging.getLogger(__name__)


class Save(enum.Enum):
    """How a job that gives GPUs up (preempted or shrunk) keeps its work."""

    #: It checkpoints now (grace-time or daemon checkpoint): nothing is lost.
    CHECKPOINT = "checkpoint"
    #: It is killed: the work since its last periodic checkpoint (or since
    #: its start, with none) is lost and counted as lost GPU time.
    KILL = "kill"


class SimJob:
    """A trace job's life in the simulation (mutable; the engine owns it)."""

    __slots__ = ("job_id", "submit", "work_total", "world_size", "min_devices", "max_devices",
                 "tier", "account", "devices", "work", "last", "stall_until", "rate",
                 "first_start", "end", "version", "preemptions", "resizes", "run_start",
                 "lost_gpu_s", "overhead_gpu_s", "restore_due", "attained_gpu_s", "view",
                 "placement", "eligible_at", "step_start", "work_at_run", "periodic_s",
                 "service", "sync")

    def __init__(self, tj: TraceJob, sync: float = 0.0) -> None:
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
        #: Earliest time it may start again (after a preemption: when its GPUs are free).
        self.eligible_at = tj.submit_s
        #: When its current step launched (the settle time counts from here).
        self.step_start = 0.0
        #: Work at its last checkpoint (what a kill falls back to).
        self.work_at_run = 0.0
        #: Period of the job's own checkpoints while it runs, seconds (0: none).
        self.periodic_s = 0.0
        #: A service (``TraceJob.service``): simulated, left out of the metrics.
        self.service = tj.service
        #: Its sync fraction at W (``sched/goodput.py``): how sub-linearly it scales.
        self.sync = sync

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

    def saved_work(self, now: float, checkpoint_s: float) -> float:
        """Work of its last durable checkpoint at ``now`` (``advance`` first):
        the start of this run, or the last periodic checkpoint since."""
        saved = self.work_at_run
        if self.periodic_s and self.rate and now > self.stall_until:
            cycle = self.periodic_s + checkpoint_s
            saved += math.floor((now - self.stall_until) / cycle) * cycle * self.rate
        return min(saved, self.work)


class Scheduler(Protocol):
    """What the engine asks of a scheduler."""

    name: str
    costs: Costs

    def attach(self, engine: "Engine") -> None: ...
    def on_arrival(self, job: SimJob, now: float) -> None: ...
    def on_finish(self, job: SimJob, now: float) -> None: ...
    def schedule(self, now: float) -> float | None:
        """Decide at ``now`` (calling ``engine.resize``); return a wake-up time or None."""


class Engine:
    """Runs one trace through one scheduler on ``total_gpus`` GPUs."""

    def __init__(self, jobs: list[TraceJob], total_gpus: int, scheduler: Scheduler,
                 progress: Callable[[int], None] | None = None, seed: int = 0) -> None:
        self.trace = jobs
        self.total_gpus = total_gpus
        self.scheduler = scheduler
        self.costs: Costs = scheduler.costs
        self.progress = progress
        #: Seed of the jobs' sync fractions (the run's seed).
        self.seed = seed
        self._linear = self.costs.scaling is Scaling.LINEAR
        self.active: dict[int, SimJob] = {}
        self.done: list[SimJob] = []
        #: GPUs that jobs hold (what schedulers count: ``total_gpus - busy`` are
        #: theirs to give, some of them only once a victim's checkpoint is durable).
        self.busy = 0
        self.pending = 0
        self.account_busy: dict[str, int] = {}
        self._events: list[tuple[float, int, int, int]] = []   # (time, seq, job_id or -1, version)
        self._seq = 0
        #: GPUs given up but still held by their old job: [free at, seq, count], a heap.
        self._held: list[list] = []
        self.held = 0
        self.samples: list[tuple[float, int, int, dict[str, int]]] = []
        self.busy_gpu_s = 0.0
        self._busy_since = 0.0
        self.now = 0.0

    # -- what schedulers call ---------------------------------------------

    def resize(self, job: SimJob, now: float, devices: int, save: Save = Save.CHECKPOINT) -> None:
        """Give ``job`` ``devices`` GPUs now (0 = preempt), charging the costs
        of ``self.costs``; ``save`` says how a job that gives GPUs up keeps its work."""
        job.advance(now)
        old = job.devices
        if devices == old:
            return
        costs = self.costs
        self._integrate(now)
        if devices < old:
            signal = max(now, job.step_start + costs.settle_s)
            if save is Save.CHECKPOINT:
                free_at = signal + costs.checkpoint_s + costs.handover_s
                job.work_at_run = job.work
            else:
                free_at = signal + costs.handover_s
                saved = job.saved_work(now, costs.checkpoint_s)
                if job.work > saved and job.rate:
                    job.lost_gpu_s += old * (job.work - saved) / job.rate
                job.work = job.work_at_run = saved
            given = old - devices
            heapq.heappush(self._held, [free_at, self._next_seq(), given])
            self.held += given
            job.overhead_gpu_s += given * (free_at - now)
            if devices == 0:
                job.preemptions += 1
                self.pending += 1
                job.eligible_at = free_at
                job.restore_due = costs.restart_s + (costs.restore_s if job.work_at_run else 0.0)
                job.stall_until = free_at
            else:
                job.resizes += 1
                job.step_start = free_at + costs.restart_s
                job.stall_until = job.step_start + costs.restore_s
        else:
            ready = self._claim(devices - old, now)
            if old == 0:
                self.pending -= 1
                if job.first_start is None:
                    job.first_start = now
                job.run_start = now
                job.step_start = max(now, ready)
                job.stall_until = job.step_start + job.restore_due
                job.restore_due = 0.0
            else:
                job.resizes += 1
                signal = max(now, job.step_start + costs.settle_s)
                job.step_start = max(signal + costs.checkpoint_s + costs.handover_s, ready) \
                    + costs.restart_s
                job.stall_until = job.step_start + costs.restore_s
                job.work_at_run = job.work
        job.overhead_gpu_s += devices * max(0.0, job.stall_until - now)
        self._account(now, job.account, devices - old)
        job.devices = devices
        if devices:
            job.rate = goodput.rate(job.world_size, devices, job.sync)
            if job.periodic_s:
                job.rate *= job.periodic_s / (job.periodic_s + costs.checkpoint_s)
        else:
            job.rate = 0.0
        job.version += 1
        if devices:
            self._push(job.finish_time(), job.job_id, job.version)

    def _claim(self, n: int, now: float) -> float:
        """Take ``n`` GPUs: free ones first, then those given up earliest;
        return when the last of them is free."""
        ready_free = self.total_gpus - self.busy - self.held
        short = n - min(n, ready_free)
        ready = now
        held = self._held
        while short > 0:
            entry = held[0]
            take = min(short, entry[2])
            entry[2] -= take
            self.held -= take
            short -= take
            ready = max(ready, entry[0])
            if not entry[2]:
                heapq.heappop(held)
        return ready

    def _integrate(self, now: float) -> None:
        """Count held GPU time up to ``now``, releasing given-up GPUs whose time came."""
        held = self._held
        while held and held[0][0] <= now:
            t, _, count = heapq.heappop(held)
            if t > self._busy_since:
                self.busy_gpu_s += (self.busy + self.held) * (t - self._busy_since)
                self._busy_since = t
            self.held -= count
        if now > self._busy_since:
            self.busy_gpu_s += (self.busy + self.held) * (now - self._busy_since)
            self._busy_since = now

    def _account(self, now: float, account: str, delta: int) -> None:
        self._integrate(now)
        if delta:
            self.busy += delta
            self.account_busy[account] = self.account_busy.get(account, 0) + delta
        if self.busy + self.held > self.total_gpus:
            raise RuntimeError(f"{self.scheduler.name}: {self.busy} GPUs busy and {self.held} "
                               f"held of {self.total_gpus}")

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _push(self, t: float, job_id: int, version: int) -> None:
        heapq.heappush(self._events, (t, self._next_seq(), job_id, version))

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
        period = self.costs.period_s
        last_end = 0.0
        while i < n or events:
            while events and events[0][2] >= 0 and (
                    events[0][2] not in active or active[events[0][2]].version != events[0][3]):
                heapq.heappop(events)             # a completion made stale by a resize
            if i >= n and (not events or not active):
                break                             # only stale wake-ups are left
            t = trace[i].submit_s if i < n else float("inf")
            if events and events[0][0] < t:
                t = events[0][0]
            if period:
                tick = math.ceil(t / period) * period
                t = tick if tick >= t else tick + period
            horizon = t
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
                last_end = et
                self._account(et, job.account, -job.devices)
                job.devices = 0
                del self.active[job_id]
                self.done.append(job)
                sched.on_finish(job, et)
            start = i
            while i < n and trace[i].submit_s <= horizon:
                tj = trace[i]
                job = SimJob(tj, 0.0 if self._linear else
                             goodput.draw_sync_fraction(tj.world_size, tj.job_id, self.seed))
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
        self._account(max(last_end, self._busy_since), "", 0)
        self._sample(last_end)
        return self.done

    def _sample(self, t: float) -> None:
        self.samples.append((t, self.busy + self.held, self.pending, dict(self.account_busy)))
