"""The simulator over a federation of clusters: three ways to share them, side by side.

Issue 16 asks whether one global decision maker that may move running jobs
between clusters does better than what a site runs today. The three
policies (``Routing``) differ only in *which cluster* a job runs on and
whether it may change; inside a cluster every one of them runs the same
planner (``sched.planner.plan``, the daemon's function) with the same
policy and pays the same measured costs (``constants.py``), so the
comparison isolates the federation layer:

- ``per-cluster``: every job belongs to a home cluster, drawn (seeded) in
  proportion to the clusters' GPUs, so that each cluster gets the same
  offered load on average; the planner runs per cluster; nothing crosses.
- ``first-sibling``: Slurm federation's routing. A job is submitted to every
  cluster; at each pass the clusters plan in order of free GPUs (the
  sibling that can start a job soonest goes first) and the first that starts
  it owns it for ever: a requeued job restarts there.
- ``global``: global placement with migration. One decision maker sees
  every cluster: at each pass it offers every pending job to one cluster
  (one with free GPUs for its tier's promised size, the most free first;
  else the one where it can take back the most GPUs: those on loan to its
  own tier and those of the tiers it may preempt) and the planner runs on
  every cluster; what is still pending is then offered to every cluster in
  first-sibling's order (the floor: a job that any cluster would start
  now under first-sibling starts now under global too; routing only one
  offer per job left basic and standard jobs pending that another cluster
  could start, and lost on average JCT); then a preempted job whose
  cluster has no room for it is restarted on a cluster that has, when the
  move pays (``MIGRATE_PAYBACK``) and leaves ``MIGRATE_KEEP`` GPUs free
  there -- the move instead of a wait in place. A move
  charges the victim's checkpoint, the copy of ``Costs.state_bytes`` over
  the link (``FederationSpec.transfer_s``), the restart and the restore; a
  job stopped before its first step has nothing to copy and moves free.
- ``global-one-pass`` (for the record, not one of issue 16's three): one
  planner call over all clusters' nodes decides who runs at what size; this
  module only picks each started job's cluster (its checkpoint's first,
  then a move that pays, else the most free), and a job that fits no single
  cluster has room made on one (the planner on that cluster alone).

Each cluster is an ``Engine`` of its own (its GPUs, its held GPUs, its
utilization); they share one event heap and one clock. This module drives
the engines' own accounting (``resize``, ``_account``, ``_push``) instead of
``Engine.run``, which knows one cluster only; the single-cluster engine is
unchanged.
"""

from __future__ import annotations

import enum
import heapq
import logging
import math
import random
import time
from dataclasses import replace
from types import SimpleNamespace
from typing import Any, Callable

from ...policy.api import Policy, Tier
from .. import planner as planner_module
from ..api import Action, ActionKind, ClusterState, JobPhase, JobState, NodeState
from ..placement import NodePool
from .constants import DAEMON_COSTS, Costs
from .engine import Engine, Save, SimJob
from .fedspec import FederationSpec
from .metrics import summarize
from .trace import TraceJob

log = logging.getLogger(__name__)

#: A job whose checkpoint lies on cluster X moves to cluster Y only if the
#: copy takes at most this share of the work it has done so far (its
#: attained service: the only estimate of what is left that a daemon has,
#: as in least-attained-service scheduling). ASSUMPTION: 10%, so a move costs
#: at most a tenth of the job's age; a job that has just started never moves.
MIGRATE_PAYBACK = 0.1

#: Most jobs per pass of the global policy that make room on one cluster
#: when they fit on none (each costs a planner call on that cluster).
#: ASSUMPTION (a bound on one pass's work, like Slurm's ``bf_max_job_test``).
FALLBACK_PER_PASS = 8


#: GPUs a move leaves free on its destination: a preempted job is not moved
#: into a cluster's last free GPU, which stays for arrivals (a premium job
#: started on it need not wait for a victim's checkpoint). ASSUMPTION, from
#: the 640-GPU Philly run (docs/simulator.md): 0 -> premium SLA 82.9% of
#: jobs (moves take the GPUs premium arrivals would have used), 1 -> 84.8%,
#: 8 -> almost no move (average JCT 10.24 h instead of 9.82 h).
MIGRATE_KEEP = 1


class Routing(enum.Enum):
    """How a federation shares its clusters (module docstring). No transitions: a run's setting."""

    PER_CLUSTER = "per-cluster"
    FIRST_SIBLING = "first-sibling"
    GLOBAL = "global"
    ONE_PASS = "global-one-pass"


#: What bench/federation.py and the docs compare: the three policies of issue 16.
COMPARED = (Routing.PER_CLUSTER, Routing.FIRST_SIBLING, Routing.GLOBAL)


def _rank(tier: Tier) -> int:
    return 2 if tier is Tier.PREMIUM else (1 if tier is Tier.STANDARD else 0)


class FedJob(SimJob):
    """A job of a federation: a ``SimJob`` that knows its cluster and its checkpoint's."""

    __slots__ = ("cluster", "ckpt_cluster", "ckpt_done", "migrations", "promised")

    def __init__(self, tj: TraceJob) -> None:
        super().__init__(tj)
        #: Cluster it runs on, or is bound to (-1: none yet).
        self.cluster = -1
        #: Cluster holding its last checkpoint (-1: none).
        self.ckpt_cluster = -1
        #: When that checkpoint is durable.
        self.ckpt_done = -math.inf
        self.migrations = 0
        #: Its tier's promised size (set by the federation).
        self.promised = 0


class _Member:
    """What an ``Engine`` asks of a scheduler; the federation decides instead."""

    def __init__(self, name: str, costs: Costs) -> None:
        self.name, self.costs = name, costs


def home_clusters(jobs: list[TraceJob], spec: FederationSpec, seed: int) -> list[int]:
    """Per-cluster policy's home of each job: drawn with the seed in
    proportion to the clusters' GPUs, among clusters big enough for its MIN."""
    rng = random.Random(seed)
    gpus = [c.gpus for c in spec.clusters]
    out = []
    for j in jobs:
        need = j.min_devices or j.world_size
        fits = [k for k, g in enumerate(gpus) if g >= need]
        out.append(rng.choices(fits, weights=[gpus[k] for k in fits])[0] if fits else -1)
    return out


def compress(jobs: list[TraceJob], factor: float) -> list[TraceJob]:
    """The trace with submissions ``factor`` times closer together (run times unchanged):
    the offered load of a trace recorded on fewer GPUs, times ``factor``."""
    if not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"time compression: must be a positive number, got {factor!r}")
    return [replace(j, submit_s=j.submit_s / factor) for j in jobs]


class Federation:
    """Runs one trace through one ``Routing`` over the clusters of ``spec``."""

    def __init__(self, spec: FederationSpec, jobs: list[TraceJob], policy: Policy,
                 routing: Routing, *, costs: Costs = DAEMON_COSTS, seed: int = 0,
                 payback: float = MIGRATE_PAYBACK,
                 progress: Callable[[int], None] | None = None) -> None:
        self.spec, self.trace, self.policy, self.routing = spec, jobs, policy, routing
        self.costs, self.payback, self.progress = costs, payback, progress
        self.events: list = []
        self.engines: list[Engine] = []
        self.nodes: list[list[NodeState]] = []
        self.free: list[int] = []
        self.where: dict[str, tuple[int, int]] = {}
        gpn = spec.gpus_per_node
        for c, cl in enumerate(spec.clusters):
            e = Engine([], cl.gpus, _Member(f"{routing.value}/{cl.name}", costs))
            e._events = self.events               # one clock, one event heap
            self.engines.append(e)
            nodes, left = [], cl.gpus
            for k in range(-(-cl.gpus // gpn)):
                g = min(gpn, left)
                left -= g
                name = f"{cl.name}/n{k + 1}"
                self.where[name] = (c, k)
                nodes.append(NodeState(name, g, g))
            self.nodes.append(nodes)
            self.free.append(cl.gpus)
        self.homes = home_clusters(jobs, spec, seed) if routing is Routing.PER_CLUSTER else None
        self.members: list[dict[int, FedJob]] = [{} for _ in spec.clusters]
        self.unbound: dict[int, FedJob] = {}
        self.active: dict[int, FedJob] = {}
        self.done: list[FedJob] = []
        self.dirty: set[int] = set()
        self.splice = policy.elastic.max_splice_factor
        self.migrations = 0
        self.bytes_moved = 0.0
        self.passes = 0
        self.plan_s = 0.0
        self._pools: dict[int, NodePool] = {}
        #: GPUs held per cluster per tier rank (0 basic .. 2 premium), and of
        #: those the GPUs on loan (above the holder's promised size).
        self.tier_busy = [[0, 0, 0] for _ in spec.clusters]
        self.tier_loan = [[0, 0, 0] for _ in spec.clusters]
        #: Ranks of the tiers each rank may preempt (from the policy).
        self.victim_ranks = [[], [], []]
        for t, ts in policy.tiers.items():
            for v, vs in policy.tiers.items():
                if t in vs.preemptible_by:
                    self.victim_ranks[_rank(t)].append(_rank(v))
        self.promise = {t: s.gpu_fraction for t, s in policy.tiers.items()}
        #: Preempted jobs waiting on their checkpoint's cluster (global policy).
        self.waiting: dict[int, FedJob] = {}

    # -- the loop (as Engine.run, over every member engine) -------------------

    def run(self) -> list[FedJob]:
        trace, events, active = self.trace, self.events, self.active
        n, i = len(trace), 0
        period = self.costs.period_s
        last_end, last_wake = 0.0, None
        while i < n or events:
            while events and events[0][2] >= 0 and (
                    events[0][2] not in active or active[events[0][2]].version != events[0][3]):
                heapq.heappop(events)
            if i >= n and (not events or not active):
                break
            t = trace[i].submit_s if i < n else math.inf
            if events and events[0][0] < t:
                t = events[0][0]
            if period:
                tick = math.ceil(t / period) * period
                t = tick if tick >= t else tick + period
            while events and events[0][0] <= t:
                et, _, job_id, version = heapq.heappop(events)
                job = active.get(job_id)
                if job is None or job.version != version:
                    continue
                self._finish(job, et)
                last_end = et
            start = i
            while i < n and trace[i].submit_s <= t:
                self._arrive(FedJob(trace[i]), trace[i].submit_s, i)
                i += 1
            if self.progress and i > start:
                self.progress(i - start)
            wake = self.schedule(t)
            if wake is not None and wake != last_wake and wake > t:
                heapq.heappush(events, (wake, -1, -1, 0))
                last_wake = wake
        for e in self.engines:
            e._account(max(last_end, e._busy_since), "", 0)
        return self.done

    def _arrive(self, job: FedJob, now: float, index: int) -> None:
        self.active[job.job_id] = job
        job.promised = self._promised(job)
        job.view = self._view(job, now)
        if self.homes is not None:
            c = self.homes[index]
            job.cluster = c
            self.members[c][job.job_id] = job
            self.dirty.add(c)
        else:
            self.unbound[job.job_id] = job
            self.dirty.add(-1)

    def _finish(self, job: FedJob, et: float) -> None:
        c = job.cluster
        job.advance(et)
        job.work = job.work_total
        job.end = et
        self.engines[c]._account(et, job.account, -job.devices)
        self._held(job, c, 0)
        self._release_nodes(c, job.placement)
        self.free[c] += job.devices
        job.devices, job.placement = 0, ()
        del self.active[job.job_id]
        del self.members[c][job.job_id]
        self.done.append(job)
        self.dirty.add(c)

    def _held(self, job: FedJob, c: int, new: int) -> None:
        """Count ``job`` going from its devices to ``new`` on cluster ``c``."""
        r, p, old = _rank(job.tier), job.promised, job.devices
        self.tier_busy[c][r] += new - old
        self.tier_loan[c][r] += max(0, new - p) - max(0, old - p)

    def _release_nodes(self, c: int, placement: tuple[tuple[str, int], ...]) -> None:
        nodes = self.nodes[c]
        for name, k in placement:
            _, idx = self.where[name]
            node = nodes[idx]
            nodes[idx] = NodeState(node.name, node.gpus, node.free_gpus + k)

    # -- views and pools -----------------------------------------------------

    @staticmethod
    def _view(job: SimJob, now: float) -> JobState:
        running = job.devices > 0
        return JobState(job.job_id, job.tier, job.account, job.world_size, job.min_devices,
                        job.max_devices, JobPhase.RUNNING if running else JobPhase.PENDING,
                        job.submit, job.devices, job.placement if running else (),
                        job.work, max(now, job.stall_until), job.rate if running else 0.0,
                        job.step_start if running else None)

    def _pool(self, c: int) -> NodePool:
        pool = self._pools.get(c)
        if pool is None:
            pool = self._pools[c] = NodePool(self.nodes[c])
        return pool

    def _sync(self) -> None:
        """Write the pass's node pools back into the clusters' node lists."""
        for c, pool in self._pools.items():
            nodes = self.nodes[c]
            for k, f in enumerate(pool.free):
                if f != nodes[k].free_gpus:
                    nodes[k] = NodeState(nodes[k].name, nodes[k].gpus, f)
        self._pools.clear()

    def _plan(self, nodes, jobs) -> tuple[Action, ...]:
        t0 = time.perf_counter()
        actions = planner_module.plan(ClusterState(self.now, tuple(nodes), tuple(jobs)), self.policy)
        self.plan_s += time.perf_counter() - t0
        self.passes += 1
        return actions

    # -- applying decisions ----------------------------------------------------

    def _stop(self, job: FedJob, to: int) -> None:
        """Shrink ``job`` to ``to`` devices (0: preempt) on its cluster, with a checkpoint."""
        now, c = self.now, job.cluster
        job.placement = self._pool(c).release(job.placement, job.devices - to)
        self.free[c] += job.devices - to
        self._held(job, c, to)
        self.engines[c].resize(job, now, to, Save.CHECKPOINT)
        if to == 0:
            self.waiting[job.job_id] = job
        job.ckpt_cluster = c
        signal = max(now, job.step_start + self.costs.settle_s) if to else None
        job.ckpt_done = (job.stall_until - self.costs.handover_s if to == 0
                         else signal + self.costs.checkpoint_s)
        job.view = self._view(job, now)

    def _start(self, job: FedJob, c: int, d: int) -> None:
        """Start pending ``job`` on cluster ``c`` at ``d`` devices; a checkpoint
        on another cluster is copied first (a migration, charged)."""
        now = self.now
        if job.cluster >= 0 and job.cluster != c:
            self.members[job.cluster].pop(job.job_id, None)
        job.cluster = c
        self.members[c][job.job_id] = job
        self.unbound.pop(job.job_id, None)
        self.waiting.pop(job.job_id, None)
        job.placement = self._pool(c).take((), d)
        self.free[c] -= d
        self._held(job, c, d)
        ready = job.ckpt_done
        src = self._ckpt(job)
        if src >= 0 and src != c:
            ready += self.spec.transfer_s(src, c, self.costs.state_bytes)
            self.migrations += 1
            job.migrations += 1
            self.bytes_moved += self.costs.state_bytes
        eng = self.engines[c]
        eng.resize(job, now, d)
        if ready > job.step_start:            # its checkpoint is not there yet: the job waits
            extra = ready - job.step_start
            job.step_start += extra
            job.stall_until += extra
            job.overhead_gpu_s += d * extra
            job.version += 1
            eng._push(job.finish_time(), job.job_id, job.version)
        job.view = self._view(job, now)

    def _grow(self, job: FedJob, to: int) -> None:
        """Grow ``job`` towards ``to`` within its cluster's free GPUs (largest legal size)."""
        c = job.cluster
        room = job.devices + self.free[c]
        ladder = planner_module.legal_sizes(job.world_size, job.devices + 1, min(to, room),
                                            self.splice)
        if not ladder:
            return
        d = ladder[-1]
        job.placement = self._pool(c).take(job.placement, d - job.devices)
        self.free[c] -= d - job.devices
        self._held(job, c, d)
        self.engines[c].resize(job, self.now, d)
        job.view = self._view(job, self.now)

    def _apply(self, c: int, actions: tuple[Action, ...]) -> list[FedJob]:
        """Apply a plan of cluster ``c``, or of the whole federation (``c`` = -1:
        this module picks each started job's cluster); return the jobs it
        started that fit on no cluster (left pending)."""
        active = self.active
        unplaced = []
        for a in actions:
            job = active[a.job_id]
            kind = a.kind
            if kind is ActionKind.PREEMPT or kind is ActionKind.SHRINK:
                self._stop(job, a.devices_to)
            elif kind is ActionKind.START:
                where = (c, a.devices_to) if c >= 0 else self._choose(job, a.devices_to)
                if where is None:
                    unplaced.append(job)
                else:
                    self._start(job, *where)
            elif kind is ActionKind.GROW:
                self._grow(job, a.devices_to)
        return unplaced

    # -- the policies ------------------------------------------------------------

    def schedule(self, now: float) -> None:
        if not self.dirty:
            return None
        self.now = now
        dirty, self.dirty = self.dirty, set()
        if self.routing is Routing.PER_CLUSTER:
            for c in sorted(dirty):
                self._apply(c, self._plan(self.nodes[c], [j.view for j in self.members[c].values()]))
                self._sync()
        elif self.routing is Routing.FIRST_SIBLING:
            self._sweep(dirty)
        elif self.routing is Routing.GLOBAL:
            self._routed()
        else:
            self._one_pass()
        return None

    def _sweep(self, dirty: set[int] | None = None) -> None:
        """Slurm federation's routing: the clusters, most free GPUs first, each
        plan their own jobs and every unbound one; the first to start a job
        owns it. ``dirty`` None: every cluster plans; else those in it, and all
        while any job is unbound."""
        order = sorted(range(len(self.nodes)), key=lambda c: (-self.free[c], c))
        for c in order:
            if dirty is not None and c not in dirty and not self.unbound:
                continue
            jobs = [j.view for j in self.members[c].values()]
            jobs += [j.view for j in self.unbound.values()]
            self._apply(c, self._plan(self.nodes[c], jobs))
            self._sync()

    def _ready(self) -> list[int]:
        """Free GPUs per cluster less those a stopped job still holds (its
        checkpoint and hand-over under way): what a job started now has at
        once, without waiting for a victim."""
        now = self.now
        return [f - sum(e[2] for e in eng._held if e[0] > now)
                for f, eng in zip(self.free, self.engines)]

    def _route_all(self) -> list[list[FedJob]]:
        """The cluster each unbound pending job is offered to in this pass,
        highest tier first, then by submission: one with ready GPUs
        (``_ready``) for its promised size
        (after the jobs routed before it), the most free first; else the one
        where it may take back the most GPUs -- those on loan to its own tier and
        those of the tiers it may preempt -- less what was routed there."""
        n = len(self.nodes)
        room = self._ready()
        offers: list[list[FedJob]] = [[] for _ in range(n)]
        order = sorted(self.unbound.values(), key=lambda j: (-_rank(j.tier), j.submit, j.job_id))
        # max-heaps (lazy: an entry whose value is stale is dropped when seen)
        by_room = [(-room[c], c) for c in range(n)]
        heapq.heapify(by_room)
        by_prey: list[tuple[int, int]] = []
        prey: list[int] = []
        rank = -1
        for job in order:
            r = _rank(job.tier)
            if r != rank:    # GPUs a job of this rank may take back or preempt, per cluster
                rank = r
                prey = [self.tier_loan[c][r] + sum(self.tier_busy[c][v] for v in self.victim_ranks[r])
                        for c in range(n)]
                by_prey = [(-(room[c] + prey[c]), c) for c in range(n)]
                heapq.heapify(by_prey)
            need = job.promised
            while -by_room[0][0] != room[by_room[0][1]]:
                heapq.heappop(by_room)
            best = by_room[0][1]
            if room[best] < need:
                while -by_prey[0][0] != room[by_prey[0][1]] + prey[by_prey[0][1]]:
                    heapq.heappop(by_prey)
                best = by_prey[0][1]
            offers[best].append(job)
            room[best] -= need
            heapq.heappush(by_room, (-room[best], best))
            heapq.heappush(by_prey, (-(room[best] + prey[best]), best))
        return offers

    def _promised(self, job: FedJob) -> int:
        """The size the planner gives a starting job when it can: its tier's promise."""
        ladder = planner_module.legal_sizes(job.world_size, job.min_devices, job.max_devices,
                                            self.splice)
        return planner_module.promised_size(ladder, job.world_size, self.promise[job.tier])

    def _routed(self) -> None:
        """Global placement with migration (module docstring): route, plan every
        cluster, sweep what is left as first-sibling does, move."""
        offers = self._route_all()
        for c, offered in enumerate(offers):
            jobs = [j.view for j in self.members[c].values()] + [j.view for j in offered]
            self._apply(c, self._plan(self.nodes[c], jobs))
            self._sync()
        if self.unbound:
            self._sweep()       # the floor: what any cluster can start now starts
        self._migrate()

    def _migrate(self) -> None:
        """Move preempted jobs whose cluster has no room for them to one that has, when it pays."""
        if not self.waiting:
            return
        most = max(self.free)
        for job in sorted(self.waiting.values(), key=lambda j: (-_rank(j.tier), j.submit, j.job_id)):
            if self.free[job.cluster] >= job.min_devices or most < job.min_devices:
                continue                    # its own cluster will restart it, or none can
            where = self._choose(job, job.promised, exclude=job.cluster, keep=MIGRATE_KEEP)
            if where is not None:
                self._start(job, *where)
        self._sync()

    @staticmethod
    def _ckpt(job: FedJob) -> int:
        """Cluster of the job's checkpoint; -1 without one or with one of no work
        (a job stopped before its first step has nothing to copy)."""
        return job.ckpt_cluster if job.work_at_run > 0 else -1

    def _pays(self, job: FedJob, src: int, dst: int) -> bool:
        return self.spec.transfer_s(src, dst, self.costs.state_bytes) \
            <= self.payback * job.work_at_run

    def _choose(self, job: FedJob, d: int, *, exclude: int = -1,
                keep: int = 0) -> tuple[int, int] | None:
        """Where a pending job starts: (cluster, devices) at ``d`` or the largest
        legal size below it; its checkpoint's cluster first (no copy), then
        clusters that a move to pays and that keep ``keep`` GPUs free after
        it, the one with most free GPUs first (the load stays balanced, so a
        checkpoint's cluster seldom stays full)."""
        src = self._ckpt(job)
        free = self.free
        ladder = planner_module.legal_sizes(job.world_size, job.min_devices, d, self.splice)
        for size in reversed(ladder):
            if src >= 0 and src != exclude and free[src] >= size:
                return src, size
            best = None
            for c, f in enumerate(free):
                if f >= size + keep and c != src and c != exclude and (best is None or f > free[best]) \
                        and (src < 0 or self._pays(job, src, c)):
                    best = c
            if best is not None:
                return best, size
        return None

    def _one_pass(self) -> None:
        """One planner pass over every cluster's nodes; this module only picks the clusters."""
        nodes = [n for ns in self.nodes for n in ns]
        unplaced = self._apply(-1, self._plan(nodes, [j.view for j in self.active.values()]))
        for job in unplaced[:FALLBACK_PER_PASS]:
            self._make_room(job)
        self._sync()

    def _make_room(self, job: FedJob) -> None:
        """A job that fits no single cluster: the planner, run on one cluster
        (its checkpoint's, else the one with most free GPUs) with only the
        running jobs there and this job, makes room for it."""
        c = self._ckpt(job) if self._ckpt(job) >= 0 else max(
            range(len(self.free)), key=lambda k: (self.free[k], -k))
        self._sync()
        running = [j.view for j in self.members[c].values() if j.devices]
        actions = self._plan(self.nodes[c], running + [job.view])
        for a in actions:
            if a.job_id == job.job_id and a.kind is ActionKind.START:
                self._start(job, c, a.devices_to)
            elif a.for_job == job.job_id and a.kind in (ActionKind.PREEMPT, ActionKind.SHRINK):
                self._stop(self.active[a.job_id], a.devices_to)

    # -- results ---------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """summary.json's fields for this run, with per-cluster utilization and moves."""
        facade = SimpleNamespace(done=self.done, total_gpus=self.spec.total_gpus,
                                 busy_gpu_s=sum(e.busy_gpu_s for e in self.engines))
        out = summarize(facade, self.policy)
        # Utilization over the whole run, services included (an Alibaba
        # service can outlive every job, and the single-cluster metric's
        # window, first submission to last job completion, would then count
        # its GPU-time in a window too short: above 100%).
        window = max(max(e._busy_since for e in self.engines) - self.trace[0].submit_s, 1e-9)
        out["utilization"] = sum(e.busy_gpu_s for e in self.engines) / (
            self.spec.total_gpus * window)
        out["utilization_by_cluster"] = {
            cl.name: e.busy_gpu_s / (cl.gpus * window) for cl, e in zip(self.spec.clusters, self.engines)}
        out["jobs_by_cluster"] = {cl.name: 0 for cl in self.spec.clusters}
        for j in self.done:
            if not j.service:
                out["jobs_by_cluster"][self.spec.clusters[j.cluster].name] += 1
        out.update(routing=self.routing.value, migrations=self.migrations,
                   bytes_moved=self.bytes_moved, planner_passes=self.passes,
                   planner_s=self.plan_s)
        return out


def simulate_federation(spec: FederationSpec, jobs: list[TraceJob], policy: Policy,
                        routings: tuple[Routing, ...] = tuple(Routing), *,
                        costs: Costs = DAEMON_COSTS, seed: int = 0,
                        payback: float = MIGRATE_PAYBACK) -> dict[str, dict[str, Any]]:
    """Every routing of ``routings`` on the same jobs; summary per routing (with ``wall_s``).

    :raises ValueError: a job needs more GPUs than the largest cluster has.
    """
    biggest = max(c.gpus for c in spec.clusters)
    too_big = [j for j in jobs if (j.min_devices or j.world_size) > biggest]
    if too_big:
        raise ValueError(f"job {too_big[0].job_id} needs at least {too_big[0].min_devices} GPUs; "
                         f"the largest cluster has {biggest} ({len(too_big)} such jobs)")
    out = {}
    for r in routings:
        t0 = time.perf_counter()
        fed = Federation(spec, jobs, policy, r, costs=costs, seed=seed, payback=payback)
        fed.run()
        out[r.value] = fed.summary()
        out[r.value]["wall_s"] = time.perf_counter() - t0
        log.info("[federation] %s: %d jobs in %.1f s", r.value, len(fed.done), out[r.value]["wall_s"])
    return out
