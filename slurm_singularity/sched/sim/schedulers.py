"""The three schedulers the simulator compares.

- ``singularity``: the project's planner, unchanged -- each pass builds a
  ``ClusterState`` and applies what ``sched.planner.plan`` returns. There is
  no second copy of its logic here, only the bookkeeping that turns actions
  into the engine's resizes and keeps each job's ``JobState`` current.
- ``slurm``: Slurm without this project: rigid jobs at their requested size
  in priority order (tier, then submission), EASY backfill with the true run
  time as the time limit (at most ``SLURM_BF_MAX_JOB_TEST`` jobs looked at
  past the first blocked one, as Slurm's ``bf_max_job_test``), and tier preemption by requeue, which restarts
  the job from zero (its work is counted as lost).
- ``tiresias``: discretized two-dimensional least-attained-service (Gu et
  al., NSDI'19): queues by attained GPU-seconds, FIFO within a queue, rigid
  sizes, checkpointed preemption; tiers are ignored, as in the paper.
"""

from __future__ import annotations

import bisect
from typing import Callable

from ...policy.api import Policy
from .. import planner as planner_module
from ..api import ActionKind, ClusterState, JobPhase, JobState, NodeState
from .constants import SLURM_BF_MAX_JOB_TEST, TIRESIAS_THRESHOLDS_GPU_S
from .engine import Engine, SimJob

SCHEDULERS = ("singularity", "slurm", "tiresias")


class SingularityScheduler:
    """Drives ``sched.planner.plan`` -- the function the daemon calls."""

    name = "singularity"

    def __init__(self, policy: Policy, total_gpus: int, gpus_per_node: int,
                 record: Callable[[ClusterState, tuple], None] | None = None) -> None:
        self.policy = policy
        count = -(-total_gpus // gpus_per_node)
        self.free = {}
        self.nodes: list[NodeState] = []
        left = total_gpus
        for k in range(count):
            g = min(gpus_per_node, left)
            left -= g
            self.free[f"n{k + 1}"] = g
            self.nodes.append(NodeState(f"n{k + 1}", g, g))
        self.node_index = {n.name: k for k, n in enumerate(self.nodes)}
        self.record = record
        self.dirty = True
        self.passes = 0

    def attach(self, engine: Engine) -> None:
        self.engine = engine

    def _view(self, job: SimJob, now: float) -> JobState:
        running = job.devices > 0
        return JobState(job.job_id, job.tier, job.account, job.world_size, job.min_devices,
                        job.max_devices, JobPhase.RUNNING if running else JobPhase.PENDING,
                        job.submit, job.devices, job.placement if running else (),
                        job.work, max(now, job.stall_until), job.rate if running else 0.0)

    def on_arrival(self, job: SimJob, now: float) -> None:
        job.view = self._view(job, now)
        self.dirty = True

    def on_finish(self, job: SimJob, now: float) -> None:
        self._move(job.placement, +1)
        job.placement = ()
        self.dirty = True

    def _move(self, placement: tuple[tuple[str, int], ...], sign: int) -> None:
        for name, n in placement:
            self.free[name] += sign * n
            k = self.node_index[name]
            self.nodes[k] = NodeState(name, self.nodes[k].gpus, self.free[name])

    def schedule(self, now: float) -> None:
        if not self.dirty:
            return None
        self.dirty = False
        engine = self.engine
        state = ClusterState(now, tuple(self.nodes), tuple(j.view for j in engine.active.values()))
        actions = planner_module.plan(state, self.policy)
        self.passes += 1
        if self.record is not None:
            self.record(state, actions)
        for a in actions:
            if a.kind is ActionKind.LEAVE:
                continue
            job = engine.active[a.job_id]
            self._move(job.placement, +1)
            self._move(a.placement, -1)
            job.placement = a.placement
            engine.resize(job, now, a.devices_to, checkpoint=True)
            job.view = self._view(job, now)
        return None


class SlurmScheduler:
    """Priority order, EASY backfill, preemption by requeue from zero."""

    name = "slurm"

    def __init__(self, policy: Policy, total_gpus: int) -> None:
        self.total = total_gpus
        self.preemptors = {t: {v for v, s in policy.tiers.items() if t in s.preemptible_by}
                           for t in policy.tiers}
        self.queue: list[tuple[int, float, int]] = []   # (-rank, submit, id), sorted
        self.running: dict[int, SimJob] = {}
        self.dirty = True

    def attach(self, engine: Engine) -> None:
        self.engine = engine

    def on_arrival(self, job: SimJob, now: float) -> None:
        bisect.insort(self.queue, (-job.tier.rank, job.submit, job.job_id))
        self.dirty = True

    def on_finish(self, job: SimJob, now: float) -> None:
        del self.running[job.job_id]
        self.dirty = True

    def _start(self, k: int, job: SimJob, now: float) -> None:
        del self.queue[k]
        self.running[job.job_id] = job
        self.engine.resize(job, now, job.world_size)

    def _preempt_for(self, job: SimJob, free: int, now: float) -> int:
        victims_tiers = self.preemptors.get(job.tier, set())
        if not victims_tiers:
            return free
        victims = [v for v in self.running.values() if v.tier in victims_tiers]
        if free + sum(v.devices for v in victims) < job.world_size:
            return free
        victims.sort(key=lambda v: (v.tier.rank, -v.run_start, -v.job_id))
        for v in victims:
            if free >= job.world_size:
                break
            free += v.devices
            del self.running[v.job_id]
            self.engine.resize(v, now, 0, checkpoint=False)     # requeue: restarts from zero
            bisect.insort(self.queue, (-v.tier.rank, v.submit, v.job_id))
        return free

    def schedule(self, now: float) -> None:
        if not self.dirty:
            return None
        self.dirty = False
        active = self.engine.active
        free = self.total - self.engine.busy
        shadow = None                # EASY: (time the head job can start, GPUs spare then)
        k = 0
        tested = 0
        while k < len(self.queue) and (free > 0 or shadow is None):
            if shadow is not None:
                tested += 1
                if tested > SLURM_BF_MAX_JOB_TEST:
                    break
            job = active[self.queue[k][2]]
            w = job.world_size
            if w > free and shadow is None and self.preemptors.get(job.tier):
                free = self._preempt_for(job, free, now)
                k = self.queue.index((-job.tier.rank, job.submit, job.job_id))
            if w <= free:
                if shadow is None or now + job.work_total <= shadow[0] or w <= shadow[1]:
                    if shadow is not None and now + job.work_total > shadow[0]:
                        shadow = (shadow[0], shadow[1] - w)
                    self._start(k, job, now)
                    free -= w
                    continue
            elif shadow is None:
                shadow = self._reserve(w, free)
            k += 1
        return None

    def _reserve(self, w: int, free: int) -> tuple[float, int]:
        ends = sorted((j.finish_time(), j.devices) for j in self.running.values())
        for t, d in ends:
            free += d
            if free >= w:
                return t, free - w
        return float("inf"), 0


class TiresiasScheduler:
    """Discretized 2D-LAS with checkpointed preemption."""

    name = "tiresias"

    def __init__(self, total_gpus: int,
                 thresholds: tuple[float, ...] = TIRESIAS_THRESHOLDS_GPU_S) -> None:
        self.total = total_gpus
        self.thresholds = thresholds
        self.queues: list[list[tuple[float, int]]] = [[] for _ in range(len(thresholds) + 1)]
        self.level: dict[int, int] = {}
        self.dirty = True

    def attach(self, engine: Engine) -> None:
        self.engine = engine

    def on_arrival(self, job: SimJob, now: float) -> None:
        self.queues[0].append((job.submit, job.job_id))   # arrivals come in submit order
        self.level[job.job_id] = 0
        self.dirty = True

    def on_finish(self, job: SimJob, now: float) -> None:
        q = self.queues[self.level.pop(job.job_id)]
        key = (job.submit, job.job_id)
        q.pop(bisect.bisect_left(q, key))
        self.dirty = True

    def schedule(self, now: float) -> float | None:
        engine = self.engine
        active = engine.active
        wake = None
        # demote running jobs whose attained service crossed a threshold
        for job in [j for j in active.values() if j.devices]:
            job.advance(now)
            lvl = self.level[job.job_id]
            if lvl < len(self.thresholds) and job.attained_gpu_s >= self.thresholds[lvl] - 1e-6:
                new = sum(1 for th in self.thresholds if job.attained_gpu_s >= th - 1e-6)
                key = (job.submit, job.job_id)
                q = self.queues[lvl]
                q.pop(bisect.bisect_left(q, key))
                bisect.insort(self.queues[new], key)
                self.level[job.job_id] = new
                self.dirty = True
        if self.dirty:
            self.dirty = False
            free = self.total
            keep: list[SimJob] = []
            for q in self.queues:
                for _, jid in q:
                    if free <= 0:
                        break
                    job = active[jid]
                    if job.world_size <= free:
                        keep.append(job)
                        free -= job.world_size
            chosen = {j.job_id for j in keep}
            for job in [j for j in active.values() if j.devices and j.job_id not in chosen]:
                engine.resize(job, now, 0, checkpoint=True)
            for job in keep:
                if not job.devices:
                    engine.resize(job, now, job.world_size)
        for job in active.values():
            lvl = self.level[job.job_id]
            if job.devices and lvl < len(self.thresholds):
                t = now + (self.thresholds[lvl] - job.attained_gpu_s) / job.devices
                wake = t if wake is None else min(wake, t)
        return wake
