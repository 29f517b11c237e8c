"""Least-attained-service baselines: Tiresias as its artifact runs, and a tier-aware LAS.

``tiresias`` follows the published artifact (SymbioticLab/Tiresias,
``simulator/run_sim.py``, ``dlas_sim_jobs`` with ``gputime=True``, the
``dlas-gpu`` schedule of its ``sim_runs.sh``), re-implemented from its
description here, not copied:

- **Discretized 2D-LAS**: queues Q0, Q1, Q2 split at 3,250 and 7,200
  GPU-seconds of attained service (executed time x GPUs); a new job enters
  the end of Q0; a running job that crosses its queue's limit moves to the
  end of the next queue.
- **A pass**: queues in order, each in its own order; a job that fits in
  what is left runs (a job that does not fit is skipped, later ones may
  still run); a running job that does not fit is preempted (with a
  checkpoint: the artifact assumes no lost work, and the runtime's measured
  costs are charged). Sizes are rigid; tiers are ignored.
- **In-queue order**: after each pass, the pending jobs of every queue move
  behind its running jobs, keeping their order: a job that was preempted or
  could not start does not go back in front of the ones that run.
- **Starvation promotion** (``tiresias:K``, the artifact's ``dlas-gpu-K``):
  a job pending in Q1 or Q2 for K times its executed time goes back to the
  end of Q0 with its executed time reset; ``tiresias`` is ``K = 0``, no
  promotion, as the artifact's default run.

The artifact runs no tiers, so against the policy's SLAs it is lopsided by
construction; ``las-tiers`` is the same 2D-LAS inside each tier, tiers in
priority order (premium, standard, basic), so a job of a higher tier always
goes first, and a running job of a tier whose ``preempt_mode`` is ``off``
(premium by default) is never preempted. Inside the other tiers LAS
preempts as Tiresias does. Both run as this project's daemon would
(``DAEMON_COSTS``: its period, settle time and restart latency).
"""

from __future__ import annotations

from ...policy.api import Policy, PreemptMode
from .constants import DAEMON_COSTS, TIRESIAS_PROMOTE_KNOB, TIRESIAS_THRESHOLDS_GPU_S, Costs
from .engine import Engine, Save, SimJob


class _Las:
    """Per-job LAS bookkeeping: queue, executed time since the last promotion,
    pending time since it, total executed time, when it was last counted."""

    __slots__ = ("group", "level", "executed", "pending", "total", "checked")

    def __init__(self, group: int, now: float) -> None:
        self.group, self.level = group, 0
        self.executed = self.pending = self.total = 0.0
        self.checked = now


class TiresiasScheduler:
    """Discretized 2D-LAS as the Tiresias artifact runs it (see the module docstring)."""

    def __init__(self, total_gpus: int, *, promote_knob: float = TIRESIAS_PROMOTE_KNOB,
                 thresholds: tuple[float, ...] = TIRESIAS_THRESHOLDS_GPU_S,
                 costs: Costs = DAEMON_COSTS, policy: Policy | None = None) -> None:
        self.total = total_gpus
        self.thresholds = thresholds
        self.knob = promote_knob
        self.costs = costs
        #: Tier -> group index (0 = first); None: one group, tiers ignored.
        self.groups = None
        self.protected: set = set()
        if policy is not None:
            order = sorted(policy.tiers, key=lambda t: -t.rank)
            self.groups = {t: k for k, t in enumerate(order)}
            self.protected = {t for t, s in policy.tiers.items() if s.preempt_mode is PreemptMode.OFF}
            self.name = "las-tiers"
        else:
            self.name = f"tiresias:{promote_knob:g}" if promote_knob else "tiresias"
        n_groups = len(self.groups) if self.groups else 1
        self.queues: list[list[list[int]]] = [[[] for _ in range(len(thresholds) + 1)]
                                              for _ in range(n_groups)]
        self.las: dict[int, _Las] = {}
        #: Jobs that hold GPUs, and pending jobs that have run (the only ones
        #: whose counters move).
        self.running: set[int] = set()
        self.waiting: set[int] = set()
        self.dirty = True

    def attach(self, engine: Engine) -> None:
        self.engine = engine

    def on_arrival(self, job: SimJob, now: float) -> None:
        group = self.groups.get(job.tier, len(self.groups) - 1) if self.groups else 0
        self.las[job.job_id] = _Las(group, now)
        self.queues[group][0].append(job.job_id)
        self.dirty = True

    def on_finish(self, job: SimJob, now: float) -> None:
        s = self.las.pop(job.job_id)
        self.queues[s.group][s.level].remove(job.job_id)
        self.running.discard(job.job_id)
        self.dirty = True

    def _count(self, now: float) -> None:
        """Bring every job's executed and pending time to ``now``; demote and promote."""
        active = self.engine.active
        last = len(self.thresholds)
        for jid in self.running:
            s = self.las[jid]
            dt = now - s.checked
            s.checked = now
            s.executed += dt
            s.total += dt
            w = active[jid].world_size
            while s.level < last and s.executed * w >= self.thresholds[s.level] - 1e-6:
                self._move(jid, s, s.level + 1)
        if not self.knob:
            return
        for jid in list(self.waiting):
            s = self.las[jid]
            s.pending += now - s.checked
            s.checked = now
            if s.level > 0 and s.pending >= s.executed * self.knob - 1e-6:
                s.executed = s.pending = 0.0
                self.waiting.discard(jid)
                self._move(jid, s, 0)

    def _move(self, jid: int, s: _Las, level: int) -> None:
        self.queues[s.group][s.level].remove(jid)
        s.level = level
        self.queues[s.group][level].append(jid)
        self.dirty = True

    def schedule(self, now: float) -> float | None:
        self._count(now)
        if not self.dirty:
            return self._next_jump(now)
        self.dirty = False
        engine = self.engine
        active = engine.active
        free = self.total
        keep: set[int] = set()
        for jid in self.running:              # a tier that is never preempted keeps its GPUs
            job = active[jid]
            if job.tier in self.protected:
                keep.add(jid)
                free -= job.world_size
        for group in self.queues:
            for q in group:
                for jid in q:
                    if jid in keep:
                        continue
                    w = active[jid].world_size
                    if w <= free:
                        keep.add(jid)
                        free -= w
        for jid in [j for j in self.running if j not in keep]:
            engine.resize(active[jid], now, 0, Save.CHECKPOINT)
            self.running.discard(jid)
            s = self.las[jid]
            s.checked = now
            if s.executed > 0:
                self.waiting.add(jid)
        for jid in keep:
            job = active[jid]
            if not job.devices:
                engine.resize(job, now, job.world_size)
                self.running.add(jid)
                self.waiting.discard(jid)
                self.las[jid].checked = now
        for group in self.queues:             # pending jobs behind the running ones
            for k, q in enumerate(group):
                group[k] = [j for j in q if active[j].devices] + [j for j in q if not active[j].devices]
        return self._next_jump(now)

    def _next_jump(self, now: float) -> float | None:
        """The next demotion of a running job or promotion of a pending one."""
        active = self.engine.active
        last = len(self.thresholds)
        wake = None
        for jid in self.running:
            s = self.las[jid]
            if s.level < last:
                w = active[jid].world_size
                t = now + (self.thresholds[s.level] - s.executed * w) / w
                if wake is None or t < wake:
                    wake = t
        for jid in self.waiting:
            s = self.las[jid]
            if s.level > 0:
                t = now + s.executed * self.knob - s.pending
                if wake is None or t < wake:
                    wake = t
        return wake
