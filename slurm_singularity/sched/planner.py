"""The planner: cluster state + policy -> actions. Pure; no I/O, no clock.

The daemon and the simulator both call :func:`plan`; nothing else in the
project decides sizes, so the decisions can be tested on small cluster shapes,
replayed from a trace, and explained from the policy.

One pass, in order:

1. **Promises first.** Per tier, highest first, every *demand* is served:
   a pending job (wants its *promised size*: the smallest legal device count
   ``D`` with ``D/W`` >= its tier's ``gpu_fraction``, at least MIN) and a
   running job held below its promised size. Within a tier, accounts take
   turns lowest weighted usage first (GPUs held / ``fair_share_weight``),
   jobs of one account least attained service first (GPU-seconds had so far;
   a running job below its promise competes in that order, not ahead of
   every pending job); a pending job starts at its MAX when free GPUs cover
   it, else at its efficient size or more (``goodput.efficient_size`` on the
   default speed-up curve: the GPUs of a step that buys little are left to
   jobs that wait; ``PlannerSettings.goodput_start``); an account never goes above its
   ``gpu_quota`` (one at its quota makes room for its demand from its own
   running jobs of the tiers the demand may preempt, when that is enough).
2. **Making room.** A demand that free GPUs cannot cover takes, in order:
   (a) devices above MIN of elastic jobs of lower tiers that it may preempt
   (the victim tier's ``preemptible_by`` lists the demand's tier) -- shrink;
   (b) devices *on loan* to jobs of its own tier (above their promised size,
   given from idle GPUs), from accounts whose weighted usage is at least its
   own -- shrink, never below the victim's promise;
   (c) whole jobs of lower tiers that it may preempt -- checkpointed preemption.
   Victims are taken jobs at or above their own promise first, most
   over-share account first, newest first. Nothing is touched unless the
   demand can then get at least its MIN; a job of a tier that is not
   ``preemptible_by`` the demand's tier is never shrunk or preempted for it.
3. **Idle GPUs to elastic jobs.** What is still free, less a small reserve
   kept for arrivals, goes, one legal step at a time, to running jobs below
   MAX: jobs below their promised GPU fraction first, then higher tiers, then
   the account with the lowest weighted usage; never a step that gains less
   work over the hysteresis window than the grow costs.

**Hysteresis**: a job that started or changed size less than ``min_run_s``
ago is no victim, except for the top tier's demands, which take it last,
and except for a fair-share correction: loans of an account above its share
go back to an account below its own (its pending job, started smaller if
fair share cannot give its MAX, or its running jobs, one step at a time),
as long as each move narrows the gap between the two (``fair_cap``), so that
corrections never swing back. Resizes the daemon has in flight
(``JobState.restart_size``) hold their account's corrections until they land.
Each of these rules is a ``PlannerSettings`` field, so the simulator can
measure what each is worth (``singularity:ABLATION``); the defaults are the
measured best (docs/simulator.md).

Every size given divides the job's world size ``W``, lies in its elastic
range and keeps ``W/D`` within ``policy.elastic.max_splice_factor``. The
output is ordered (preemptions and shrinks, then starts and grows, each in the
order decided) and depends only on the input, so the daemon and the simulator
replay the same decisions.
"""

from __future__ import annotations

import heapq
import logging
import math
from functools import lru_cache

from ..policy.api import Policy, PreemptMode, Tier
from . import goodput
from .api import Action, ActionKind, ClusterState, JobPhase, PlannerSettings, SchedError
from .placement import NodePool

log = logging.getLogger(__name__)

_EPS = 1e-9



@lru_cache(maxsize=4096)
def legal_sizes(world_size: int, lo: int, hi: int, max_splice: int) -> tuple[int, ...]:
    """Device counts a job may run on, ascending: divisors of ``world_size``
    in ``lo..hi`` with ``world_size / D <= max_splice``."""
    return tuple(d for d in range(max(lo, 1), hi + 1)
                 if world_size % d == 0 and world_size // d <= max_splice)


def promised_size(ladder: tuple[int, ...], world_size: int, promise: float) -> int:
    """Smallest size in ``ladder`` whose ``D/W`` meets ``promise`` (else the largest)."""
    for d in ladder:
        if d >= promise * world_size - _EPS:
            return d
    return ladder[-1]


@lru_cache(maxsize=8192)
def _promised(world_size: int, lo: int, hi: int, max_splice: int, promise: float) -> int:
    ladder = legal_sizes(world_size, lo, hi, max_splice)
    return promised_size(ladder, world_size, promise) if ladder else 0


#: The settings the daemon and the simulator use unless told otherwise.
DEFAULT_SETTINGS = PlannerSettings()


def plan(state: ClusterState, policy: Policy, *, explain_waiting: bool = False,
         settings: PlannerSettings = DEFAULT_SETTINGS, reuse: bool = True) -> tuple[Action, ...]:
    """Decide what to do now.

    :param explain_waiting: also return a LEAVE action, with the reason, for
        every pending job that is not started (for ``job explain``).
    :param settings: hysteresis, in-tier order, fair share, growth cost and
        elasticity (``PlannerSettings``; the ablations turn them off).
    :param reuse: reuse, while no size changed, what one demand's search for
        GPUs found for the next demand of its account (``_Pass._reach``): the
        same decisions, faster under contention; False is the plain search
        (the simulator checks the two agree).
    :raises SchedError: a job's tier is missing from the policy.
    """
    return _Pass(state, policy, explain_waiting, settings, reuse).run()


_RANK_TIER = {2: Tier.PREMIUM, 1: Tier.STANDARD, 0: Tier.BASIC}


def _rank(t: Tier) -> int:
    """Tier rank by identity (cheaper than hashing the Enum in the hot loops)."""
    return 2 if t is Tier.PREMIUM else (1 if t is Tier.STANDARD else 0)


class _Pass:
    """The working state of one planning pass (lists indexed by job position).

    Costs are kept proportional to what can change: the pass reads every job
    once; it sorts victims, builds ladders and sorts a tier's demands only
    when some GPUs could be found for that tier.
    """

    def __init__(self, state: ClusterState, policy: Policy, explain: bool,
                 settings: PlannerSettings = DEFAULT_SETTINGS, reuse: bool = True) -> None:
        self.state = state
        self.reuse = reuse
        #: sizes changed so far (``set_target``); ``_reach`` holds for one value
        self.version = 0
        self._reach: dict[tuple, object] = {}
        self._reach_version = 0
        self.settings = settings
        self.rigid = not settings.elastic
        self.fair = settings.fair_share
        self.policy = policy
        self.explain = explain
        self.now = state.now
        self.free = state.free_gpus
        self.total = state.total_gpus
        self.splice = policy.elastic.max_splice_factor
        specs = policy.tiers
        self.promise = [0.0, 0.0, 0.0]
        self.victim_ranks: list[list[int]] = [[], [], []]
        self.top = max((_rank(t) for t in specs), default=2)
        # least-attained-service preemption inside a tier: only where the
        # tier promises no GPU fraction (PlannerSettings.las_preempt_factor)
        self.las_preempt = [settings.las_preempt_factor > 0 and _RANK_TIER[r] in specs
                            and specs[_RANK_TIER[r]].gpu_fraction <= 0
                            and specs[_RANK_TIER[r]].preempt_mode is not PreemptMode.OFF
                            for r in (0, 1, 2)]
        for t, spec in specs.items():
            self.promise[_rank(t)] = spec.gpu_fraction
        for t in specs:
            self.victim_ranks[_rank(t)] = [_rank(v) for v in sorted(specs, key=_rank)
                                           if t in specs[v].preemptible_by]
        self.weight: dict[str, float] = {}
        self.quota: dict[str, int | None] = {}
        jobs = state.jobs
        self.jobs = jobs
        n = len(jobs)
        self.tgt = tgt = [0] * n
        self.running: tuple[list[int], ...] = ([], [], [])
        self.elastic: tuple[list[int], ...] = ([], [], [])
        self.pending: tuple[list[int], ...] = ([], [], [])
        self.whole = [0, 0, 0]
        usage: dict[str, int] = {}
        #: (rank, account) with a resize in flight (the daemon's: a job
        #: RESIZING, or pending with a ``restart_size``; the simulator's
        #: resizes are instant): no fair-share correction between such an
        #: account and another until it lands (``fair_cap``)
        self.moving = moving = set()
        grows = 0
        run_phase, pend_phase = JobPhase.RUNNING, JobPhase.PENDING
        prem, std = Tier.PREMIUM, Tier.STANDARD
        pending, running, elastic, whole = self.pending, self.running, self.elastic, self.whole
        for i, job in enumerate(jobs):               # the one loop over all jobs: keep it lean
            phase = job.phase
            t = job.tier
            r = 2 if t is prem else (1 if t is std else 0)
            if phase is pend_phase:
                pending[r].append(i)
                if job.restart_size:
                    moving.add((r, job.account))
            elif phase is run_phase:
                d = tgt[i] = job.devices
                running[r].append(i)
                whole[r] += d
                if job.min_devices < job.max_devices and settings.elastic:
                    elastic[r].append(i)
                usage[job.account] = usage.get(job.account, 0) + d
            elif not phase.terminal:
                d = max(job.devices, job.restart_size)
                usage[job.account] = usage.get(job.account, 0) + d
                moving.add((r, job.account))
                if d > job.devices:
                    grows += d - job.devices    # a grow in flight: its GPUs are taken
        for r in (2, 1, 0):
            group = self.running[r] or self.pending[r]
            if group and _RANK_TIER[r] not in specs:
                raise SchedError(f"job {jobs[group[0]].job_id}: tier "
                                 f"{_RANK_TIER[r].value!r} is not in the policy")
        self.free -= grows
        self.usage = usage
        for a in list(usage):
            self._account(a)
        self.start_norm = {a: usage[a] / self.weight[a] for a in usage}
        self._ladders: dict[int, tuple[int, ...]] = {}
        self._promised_of: dict[int, int] = {}
        self._floor_of: dict[int, int] = {}      # promise_floor's, before the min with tgt
        self._lender_sets: list[set[str] | None] = [None, None, None]
        self.frac: dict[int, float] = {}
        self.loan = [-1, -1, -1]          # GPUs on loan per rank, computed when first needed
        self.pool: dict[tuple[int, str], list[int]] = {}
        self.cursor: dict[tuple[int, str], int] = {}
        self.started: list[int] = []
        # decisions, for reasons: job -> (requester, via) for victims; job -> text for takers
        self.victim_of: dict[int, tuple[int, str]] = {}
        self.victim_count: dict[int, int] = {}
        self.granted: dict[int, str] = {}
        self.waiting: dict[int, str] = {}
        self.touched: dict[int, None] = {}

    # -- helpers ------------------------------------------------------------

    def _account(self, acct: str) -> None:
        if acct not in self.weight:
            spec = self.policy.accounts.get(acct)
            self.weight[acct] = spec.fair_share_weight if spec else 1.0
            self.quota[acct] = spec.gpu_quota if spec else None
            self.usage.setdefault(acct, 0)

    def lad(self, i: int) -> tuple[int, ...]:
        lad = self._ladders.get(i)
        if lad is None:
            job = self.jobs[i]
            lo = job.max_devices if self.rigid else job.min_devices
            lad = self._ladders[i] = legal_sizes(job.world_size, lo, job.max_devices,
                                                 self.splice)
        return lad

    def start_ladder(self, i: int):
        """Sizes a pending job may start at: its MAX only (``start_at_max``),
        or the largest size the cluster has if its MAX is larger."""
        lad = self.lad(i)
        size = self.jobs[i].restart_size
        if size and size in lad:
            return [size]             # resized by a requeue: restarts at its new size
        if not self.settings.start_at_max:
            return lad
        fits = [d for d in lad if d <= self.total] or lad[:1]
        share = self.settings.goodput_start
        if share <= 0 or len(fits) < 2:
            return fits[-1:]
        job = self.jobs[i]
        least = goodput.efficient_size(tuple(fits), job.world_size, share)
        return [d for d in fits if d >= least]

    def promised(self, i: int) -> int:
        p = self._promised_of.get(i)
        if p is None:
            job = self.jobs[i]
            lo = job.max_devices if self.rigid else job.min_devices
            p = self._promised_of[i] = _promised(job.world_size, lo, job.max_devices,
                                                 self.splice, self.promise[_rank(job.tier)])
        return p

    def attained(self, i: int) -> float:
        """GPU-seconds of service so far, as least attained service counts it."""
        job = self.jobs[i]
        return job.work_at(self.now) * job.world_size

    def protected(self, i: int) -> bool:
        """Within ``min_run_s`` of its last start or resize (hysteresis)."""
        at = self.jobs[i].sized_at
        return at is not None and self.now - at < self.settings.min_run_s

    def grow_pays(self, i: int, cur: int, nxt: int) -> bool:
        """Whether growing job ``i`` from ``cur`` to ``nxt`` GPUs saves at least
        ``grow_payback`` times what the grow costs. The remaining work is
        estimated as the work done so far (least attained service's premise:
        a job that has run long runs long)."""
        s = self.settings
        job = self.jobs[i]
        w = job.world_size
        if s.goodput_start > 0 and s.min_run_s > 0 and (
                goodput.grow_gain_s(w, cur, nxt, s.min_run_s)
                < goodput.planner_rate(w, nxt) * s.grow_cost_s):
            return False              # gains less over the hysteresis window than it costs
        if s.grow_payback <= 0:
            return True
        left = job.work_at(self.now)
        saved = left / goodput.planner_rate(w, cur) - left / goodput.planner_rate(w, nxt)
        return saved >= s.grow_payback * s.grow_cost_s

    def norm(self, acct: str) -> float:
        return self.usage[acct] / self.weight[acct] if self.fair else 0.0

    def fraction(self, i: int) -> float:
        f = self.frac.get(i)
        if f is None:
            f = self.frac[i] = self.jobs[i].gpu_fraction(self.now)
        return f

    def below_promise(self, i: int) -> bool:
        return self.fraction(i) < self.promise[_rank(self.jobs[i].tier)] - _EPS

    def min_floor(self, i: int) -> int:
        lad = self.lad(i)
        return min(lad[0], self.tgt[i]) if lad else self.tgt[i]

    def promise_floor(self, i: int) -> int:
        p = self._floor_of.get(i)
        if p is None:
            lad = self.lad(i)
            p = self._floor_of[i] = max(lad[0], self.promised(i)) if lad else 1 << 60
        t = self.tgt[i]
        return p if p < t else t

    def quota_left(self, acct: str) -> int:
        q = self.quota[acct]
        return 1 << 60 if q is None else q - self.usage[acct]

    def loan_cap(self, r: int) -> int:
        if self.loan[r] < 0:
            tgt, floor_of, total = self.tgt, self._floor_of, 0
            for i in self.elastic[r]:       # tgt - promise_floor, without a call per job
                p = floor_of.get(i)
                if p is None:
                    self.promise_floor(i)
                    p = floor_of[i]
                if tgt[i] > p:
                    total += tgt[i] - p
            self.loan[r] = total
        return self.loan[r]

    def bound(self, r: int) -> int:
        """Most GPUs a demand of rank ``r`` could get now (free + what it may take)."""
        loan = self.loan[r]
        got = self.free + (loan if loan >= 0 else self.loan_cap(r))
        whole = self.whole
        for v in self.victim_ranks[r]:
            got += whole[v]
        return got + whole[r] if self.las_preempt[r] else got

    def set_target(self, i: int, size: int) -> None:
        acct = self.jobs[i].account
        self.usage[acct] += size - self.tgt[i]
        self.free -= size - self.tgt[i]
        self.tgt[i] = size
        self.touched[i] = None
        self.version += 1

    # -- the pass -----------------------------------------------------------

    def run(self) -> tuple[Action, ...]:
        for r in (2, 1, 0):
            self._serve_rank(r)
        reserve = int(self.settings.grow_reserve * self.total)
        if self.free > reserve:
            self.free -= reserve      # left idle for arrivals (PlannerSettings.grow_reserve)
            self._grow_idle()
            self.free += reserve
        return self._actions()

    def _serve_rank(self, r: int) -> None:
        self._serve_demands(r)
        self._rebalance(r)

    def _serve_demands(self, r: int) -> None:
        jobs = self.jobs
        groups: dict[str, list[tuple[float, float, int, int]]] = {}
        las, fair = self.settings.las_order, self.fair
        if self.promise[r] > 0:
            for i in self.elastic[r]:       # a job shrunk in this pass waits for the next
                if (self.tgt[i] < jobs[i].max_devices and i not in self.victim_of
                        and self.lad(i) and self.tgt[i] < self.promised(i)):
                    job = jobs[i]
                    groups.setdefault(job.account if fair else "", []).append(
                        (self.attained(i) if las else 0, job.submit_time, job.job_id, i))
        if not (groups or self.pending[r]):
            return
        if self.bound(r) <= 0:
            return
        for i in self.pending[r]:
            job = jobs[i]
            groups.setdefault(job.account if fair else "", []).append(
                (self.attained(i) if las else 1, job.submit_time, job.job_id, i))
        for acct, lst in groups.items():
            if fair:
                self._account(acct)
            else:
                for e in lst:
                    self._account(jobs[e[3]].account)
            lst.sort()
        heap = [(self.norm(a), a, 0) for a in groups]
        heapq.heapify(heap)
        while heap and self.bound(r) > 0:
            _, acct, k = heapq.heappop(heap)
            self._serve(r, groups[acct][k][3])
            if k + 1 < len(groups[acct]):
                heapq.heappush(heap, (self.norm(acct), acct, k + 1))

    def _serve(self, r: int, i: int) -> None:
        """Serve demand ``i`` of rank ``r`` if it can be; with ``reuse``, a
        demand of the same account, shape and size as one that could not be
        served while no size has changed since is not tried again."""
        if not self.reuse:
            return self._serve_one(r, i)
        job = self.jobs[i]
        key = ("serve", r, job.account, job.world_size, job.min_devices, job.max_devices,
               job.restart_size, self.tgt[i],
               self.las_threshold(i) if self.las_preempt[r] else None)
        failed = self._reused()
        if key in failed:
            if failed[key]:
                self.waiting[i] = failed[key]
            return None
        version = self.version
        self._serve_one(r, i)
        if self.version == version:
            failed[key] = self.waiting.get(i)
        return None

    def _serve_one(self, r: int, i: int) -> None:
        job = self.jobs[i]
        lad = self.lad(i)
        if not lad:
            self.waiting[i] = (f"no device count in the elastic range {job.min_devices}:"
                               f"{job.max_devices} divides W={job.world_size} within splice "
                               f"factor {self.splice}")
            return
        cur = self.tgt[i]
        want = max(lad[0], self.promised(i))
        if cur == 0:
            lad = self.start_ladder(i)
            if self.settings.start_at_max:
                want = lad[-1]
                if len(lad) > 1 and self.free < want:
                    # goodput-aware start: the efficient size, or what free GPUs give
                    want = max(d for d in lad if d <= max(lad[0], self.free))
        least = lad[0] if cur == 0 else next(d for d in lad if d > cur)
        room = self.quota_left(job.account) + cur
        if least > room:
            room += self._displace_own(r, i, least - room, least - cur)
        if least > room:
            self.waiting[i] = (f"account {job.account} is at its gpu_quota of "
                               f"{self.quota[job.account]} GPUs")
            return
        want = max(d for d in lad if d <= max(least, min(want, room)))
        if self.free >= want - cur:
            self.set_target(i, want)
            self._granted(i, cur, want, "free GPUs")
            return
        if least - cur > self.bound(r):
            return
        reach = self.free + self._reclaimable(r, i, want - cur - self.free)
        size = max((d for d in lad if cur < d <= want and d - cur <= reach), default=0)
        if size < least and cur == 0:
            size = self._fair_start(r, i, room)
        if size < least and (cur or size <= 0):
            return
        need = size - cur - self.free
        taken = self._reclaim(r, i, need) if need > 0 else "free GPUs"
        self.set_target(i, size)
        self._granted(i, cur, size, taken)

    def _fair_start(self, r: int, i: int, room: int) -> int:
        """The size at which pending job ``i`` starts below its MAX, or 0:
        only when its account is below its fair share and the GPUs that fair
        share lets it take back from other accounts (``fair_cap``) are too
        few for its MAX. Otherwise an account below its share would wait for
        a MAX that no fair correction can give it."""
        full = self.lad(i)
        if (not (self.fair and self.settings.start_at_max) or len(full) < 2
                or self.jobs[i].restart_size):
            return 0
        lent = self._loans(r, i, full[-1], r == self.top, take=False, cross_only=True)
        if lent <= 0:
            return 0
        return max((d for d in full if d <= min(self.free + lent, room)), default=0)

    def _granted(self, i: int, cur: int, size: int, source: str) -> None:
        job = self.jobs[i]
        if cur == 0:
            self.started.append(i)
        p = self.promise[_rank(job.tier)]
        verb = "start" if cur == 0 else "grow"
        self.granted[i] = (
            f"{verb} at {size} of W={job.world_size} (elastic {job.min_devices}:"
            f"{job.max_devices}): tier {job.tier.value} promises {p:.0%} GPU fraction, "
            f"promised size {self.promised(i)}; account {job.account} holds "
            f"{self.usage[job.account]} GPUs (weight {self.weight[job.account]:g}); "
            f"GPUs from {source}")

    def _stages(self, r: int, i: int):
        for v in self.victim_ranks[r]:
            yield v, "shrink"
        yield r, "loan"
        for v in self.victim_ranks[r]:
            yield v, "whole"
        if self.las_preempt[r] and self.tgt[i] == 0:
            yield r, "las"

    def las_threshold(self, i: int) -> float:
        """Attained GPU-seconds a running job of demand ``i``'s own tier must
        have for ``i`` to preempt it (least attained service)."""
        s = self.settings
        return max(s.las_preempt_min_gpu_s, s.las_preempt_factor * self.attained(i))

    def _pool(self, r: int, kind: str, top: bool) -> list[int]:
        """Victims of rank ``r`` for stage ``kind``, in the order they are
        taken. Jobs under hysteresis (``protected``) are left out, or put last
        when the demand is of the top tier (``top``)."""
        key = (r, kind, top)
        pool = self.pool.get(key)
        if pool is None:
            jobs = self.jobs
            norm = self.start_norm if self.fair else {}
            members = self.running[r] if kind in ("whole", "las") else self.elastic[r]
            if self.settings.min_run_s > 0 and (kind == "las" or (not top and kind != "loan")):
                # a loan keeps its protected jobs, last: a fair-share correction
                # takes from them (``_loan_size``)
                members = [i for i in members if not self.protected(i)]
            if kind == "las":       # most attained service first
                pool = self.pool[key] = sorted(members, key=lambda i: (-self.attained(i), i))
                self.cursor[key] = 0
                return pool
            guard = self.protected if self.settings.min_run_s > 0 else (lambda i: False)
            promise = self.promise[r]
            pool = self.pool[key] = sorted(members, key=lambda i: (
                guard(i), self.below_promise(i), -norm.get(jobs[i].account, 0.0),
                -(self.fraction(i) - promise), -jobs[i].submit_time, -jobs[i].job_id))
            self.cursor[key] = 0
        return pool

    def _floor(self, i: int, kind: str) -> int:
        if kind == "shrink":
            return self.min_floor(i)
        if kind == "loan":
            return self.promise_floor(i)
        return 0

    def _reach_of(self, key: tuple, walk, need: int) -> int:
        """``walk(need)``, reusing a walk that ran out while no size has
        changed. A walk that cannot cover its need has taken the most it can
        at every step, so every larger need gets the same total: the next
        demand of the same account that needs more (the common case under
        contention) gets it without walking again."""
        if not self.reuse:
            return walk(need)
        reach = self._reused()
        total = reach.get(key)
        if total is not None and need > total:
            return total
        got = walk(need)
        if got < need:
            reach[key] = got
        return got

    def _reused(self) -> dict:
        """What ``_serve`` and ``_reach_of`` found since the last size changed."""
        if self._reach_version != self.version:
            self._reach.clear()
            self._reach_version = self.version
        return self._reach

    def _reclaimable(self, r: int, i: int, need: int) -> int:
        """How much stages (a)-(c) could free for demand ``i``, counting up to ``need``."""
        job = self.jobs[i]
        las = self.las_threshold(i) if self.las_preempt[r] and self.tgt[i] == 0 else None
        return self._reach_of(("all", r, job.account, job.restart_size > 0, las),
                              lambda n: self._reclaimable_walk(r, i, n), need)

    def _reclaimable_walk(self, r: int, i: int, need: int) -> int:
        got = 0
        top = r == self.top
        for v, kind in self._stages(r, i):
            pool = self._pool(v, kind, top)
            bar = self.las_threshold(i) if kind == "las" else 0.0
            if kind == "loan":
                got += self._loans(v, i, need - got, top, take=False)
                if got >= need:
                    return got
                continue
            for pos in range(self.cursor[v, kind, top], len(pool)):
                j = pool[pos]
                if kind == "las":
                    if self.attained(j) < bar:
                        break
                    got += min(self.tgt[j], self.promise_floor(j))
                elif kind == "whole":
                    got += min(self.tgt[j], self.min_floor(j))
                else:
                    got += max(0, self.tgt[j] - self._floor(j, kind))
                if got >= need:
                    return got
        return got

    def _reclaim(self, r: int, i: int, need: int) -> str:
        """Free at least ``need`` GPUs for job ``i`` along the stages; say how."""
        counts = {"shrink": 0, "loan": 0, "whole": 0, "las": 0}
        top = r == self.top
        for v, kind in self._stages(r, i):
            if need <= 0:
                break
            if kind == "loan":
                taken, n = self._loans(v, i, need, top, take=True)
                need -= taken
                counts[kind] += n
                continue
            pool = self._pool(v, kind, top)
            pos = self.cursor[v, kind, top]
            bar = self.las_threshold(i) if kind == "las" else 0.0
            while pos < len(pool) and need > 0:
                j = pool[pos]
                if kind == "las" and self.attained(j) < bar:
                    break
                cur = self.tgt[j]
                floor = self._floor(j, kind)
                if cur <= floor:
                    pos += 1
                    continue
                size = floor
                if kind not in ("whole", "las"):
                    size = max((d for d in self.lad(j) if floor <= d < cur and cur - d >= need),
                               default=floor)
                self._take(v, j, size, i, kind)
                counts[kind] += 1
                need -= cur - size
                if size <= floor:
                    pos += 1
            self.cursor[v, kind, top] = pos
        parts = [f"{counts['shrink']} lower-tier job(s) shrunk"] if counts["shrink"] else []
        if counts["loan"]:
            parts.append(f"{counts['loan']} loan(s) of {_RANK_TIER[r].value} jobs taken back")
        if counts["whole"]:
            parts.append(f"{counts['whole']} lower-tier job(s) preempted")
        if counts["las"]:
            parts.append(f"{counts['las']} {_RANK_TIER[r].value} job(s) with more attained "
                         f"service preempted")
        return "free GPUs and " + ", ".join(parts)

    def fair_cap(self, r: int, victim: str, taker: str, landing: bool = False) -> int:
        """Most GPUs that may go from account ``victim`` to account ``taker``
        in rank ``r`` as a fair-share correction: the move must narrow the
        gap between their usages per weight (it may overshoot by less than
        it closes), so that corrections never swing back and forth. 0 when
        the victim is not above the taker, or while either has a resize of
        that rank in flight (the daemon: its usage is not what it will be;
        the next correction is decided once the last one has landed) --
        except for the taker's job that is landing (``landing``: restarting
        at its new size, ``JobState.restart_size``)."""
        gap = self.norm(victim) - self.norm(taker)
        if gap <= _EPS or (not landing and ((r, victim) in self.moving
                                            or (r, taker) in self.moving)):
            return 0
        span = 1.0 / self.weight[victim] + 1.0 / self.weight[taker]
        return max(0, math.ceil(2.0 * gap / span - _EPS) - 1)

    def _loans(self, v: int, i: int, need: int, top: bool, take: bool,
               cross_only: bool = False):
        """GPUs on loan in rank ``v`` (above their jobs' promised sizes) that
        demand ``i`` may take back, up to ``need``: counted (``take=False``;
        returns the count) or taken (returns ``(GPUs taken, jobs shrunk)``).

        From another account only as a fair-share correction (``fair_cap``),
        and then hysteresis does not hold the job: a job over its account's
        share while another account is below its own is what a shrink is
        for. From the demand's own account, or with fair share off, only
        jobs out of hysteresis (the top tier's demands take those last).
        ``cross_only``: from other accounts only."""
        if not take:
            job = self.jobs[i]
            return self._reach_of(("loan", v, job.account, job.restart_size > 0, top, cross_only),
                                  lambda n: self._loans_walk(v, i, n, top, False, cross_only),
                                  need)
        return self._loans_walk(v, i, need, top, take, cross_only)

    def _loans_walk(self, v: int, i: int, need: int, top: bool, take: bool,
                    cross_only: bool = False):
        key = (v, "loan", top)
        pool = self._pool(v, "loan", top)
        me = self.jobs[i].account
        landing = self.jobs[i].restart_size > 0
        guard = self.settings.min_run_s > 0 and not top
        left: dict[str, int] = {}
        got = shrunk = 0
        pos = start = self.cursor[key]
        fair = self.fair
        lenders = self._lenders(v)
        if not ((me in lenders and not cross_only) or (lenders and not fair) or any(
                a != me and self.norm(a) > self.norm(me) + _EPS for a in lenders)):
            return (0, 0) if take else 0  # no account may lend to this one now
        while pos < len(pool) and got < need:
            j = pool[pos]
            pos += 1
            acct = self.jobs[j].account
            cap = -1
            if fair and acct != me:
                cap = left.get(acct)
                if cap is None:
                    cap = left[acct] = self.fair_cap(v, acct, me, landing)
                if cap <= 0 and pos - 1 != start:
                    continue              # (checked before the floor: the common case)
            cur, floor = self.tgt[j], self.promise_floor(j)
            if cur <= floor:
                if pos - 1 == start:
                    start = pos           # nothing left on loan: for every demand
                continue
            if cap >= 0:
                pass
            elif cross_only or (guard and self.protected(j)):
                continue
            else:
                cap = cur - floor
            sizes = [d for d in self.lad(j) if floor <= d < cur and cur - d <= cap]
            if not sizes:
                continue
            size = max((d for d in sizes if cur - d >= need - got), default=sizes[0])
            if acct in left:
                left[acct] -= cur - size
            got += cur - size
            if take:
                self._take(v, j, size, i, "loan")
                shrunk += 1
        if not take:
            return got
        self.cursor[key] = start
        return got, shrunk

    def _lenders(self, r: int) -> set[str]:
        """Accounts with GPUs on loan in rank ``r`` at the start of the pass
        (a superset later: loans are only taken back within a pass before
        idle GPUs are handed out)."""
        out = self._lender_sets[r]
        if out is None:
            jobs = self.jobs
            out = self._lender_sets[r] = {jobs[j].account for j in self.elastic[r]
                                          if self.tgt[j] > self.promise_floor(j)}
        return out

    def _rebalance(self, r: int) -> None:
        """Fair share among the running jobs of rank ``r``: a running
        elastic job of the account furthest below its share grows one step
        with GPUs on loan to an account above its share (``_loans``), while
        that narrows the gap (``fair_cap``). Pending jobs take loans back as
        they start; without this, jobs that grew while GPUs were idle would
        keep their account above its share for as long as they run."""
        if not self.fair or not self.elastic[r]:
            return
        jobs = self.jobs
        growers: dict[str, list[int]] = {}
        short = False                     # some grower needs more than the free GPUs
        for i in self.elastic[r]:
            lad = self.lad(i)
            cur = self.tgt[i]
            if lad and 0 < cur < lad[-1] and i not in self.victim_of:
                growers.setdefault(jobs[i].account, []).append(i)
                short = short or next(d for d in lad if d > cur) - cur > self.free
        if not short or self.loan_cap(r) <= 0:
            return                        # idle GPUs cover every step (_grow_idle's), or no loans
        for _ in range(4 * len(self.elastic[r])):
            lenders = {jobs[j].account for j in self.elastic[r]
                       if self.tgt[j] > self.promise_floor(j)}
            high = max((self.norm(a) for a in lenders), default=0.0)
            for acct in sorted(growers, key=lambda a: (self.norm(a), a)):
                if self.norm(acct) >= high - _EPS:
                    return
                if self._fair_grow(r, growers[acct]):
                    break
            else:
                return

    def _fair_grow(self, r: int, mine: list[int]) -> bool:
        """Grow one of ``mine`` (running jobs of one account, rank ``r``) one
        step with loans of accounts above its share; whether one grew."""
        jobs = self.jobs
        top = r == self.top

        def step(i: int) -> int:
            cur = self.tgt[i]
            return next((d for d in self.lad(i) if d > cur), cur) - cur

        for i in sorted(mine, key=lambda i: (step(i), self.attained(i), jobs[i].job_id)):
            cur = self.tgt[i]
            need = step(i)
            if i in self.victim_of or not need or need > self.quota_left(jobs[i].account):
                continue
            lent = need - max(0, self.free)
            if lent <= 0:
                continue                  # idle GPUs are _grow_idle's
            if self._loans(r, i, lent, top, take=False, cross_only=True) < lent:
                continue
            self._loans(r, i, lent, top, take=True, cross_only=True)
            acct = jobs[i].account
            self.set_target(i, cur + need)
            self.granted[i] = (
                f"grow to {cur + need} of MAX={jobs[i].max_devices} for fair share: account "
                f"{acct} is below its share in tier {jobs[i].tier.value} ({self.usage[acct]} "
                f"GPUs after, weight {self.weight[acct]:g}); GPUs on loan to accounts above "
                f"theirs taken back")
            return True
        return False

    def _take(self, v: int, j: int, size: int, i: int, kind: str) -> None:
        """Set victim ``j`` (rank ``v``) to ``size`` for demand ``i``."""
        cur = self.tgt[j]
        if self.loan[v] >= 0:
            self.loan[v] -= max(0, cur - max(size, self.promise_floor(j)))
        self.whole[v] -= cur - size
        self.set_target(j, size)
        self.victim_of.setdefault(j, (i, kind))
        self.victim_count[j] = self.victim_count.get(j, 0) + 1

    def _displace_own(self, r: int, i: int, need: int, fill: int) -> int:
        """An account at its ``gpu_quota`` makes room for its own demand
        ``i`` (rank ``r``) from its own running jobs of the tiers ``r`` may
        preempt: devices above MIN first, then whole jobs, newest first.
        Only when ``need`` GPUs can be taken that way and free GPUs plus
        those cover ``fill`` (what the demand needs to reach its MIN); it
        takes enough that they do, so nothing is touched in vain. Returns
        the GPUs taken."""
        acct = self.jobs[i].account
        own = sorted((j for v in self.victim_ranks[r] for j in self.running[v]
                      if self.jobs[j].account == acct and self.tgt[j] > 0),
                     key=lambda j: (-self.jobs[j].submit_time, -self.jobs[j].job_id))
        total = sum(self.tgt[j] for j in own)
        if total < need or self.free + total < fill:
            return 0
        need = max(need, fill - self.free)   # then free GPUs cover the demand's MIN
        taken = 0
        for kind in ("shrink", "whole"):
            for j in own:
                if taken >= need:
                    return taken
                cur, floor = self.tgt[j], (self.min_floor(j) if kind == "shrink" else 0)
                if cur <= floor:
                    continue
                size = floor
                if kind == "shrink":
                    size = max((d for d in self.lad(j) if floor <= d < cur and
                                cur - d >= need - taken), default=floor)
                self._take(_rank(self.jobs[j].tier), j, size, i, "own")
                taken += cur - size
        return taken

    def _grow_idle(self) -> None:
        jobs = self.jobs
        heap = []
        for i in [i for el in self.elastic for i in el] + self.started:
            cur = self.tgt[i]
            if cur and cur < jobs[i].max_devices and not jobs[i].restart_size:
                lad = self.lad(i)
                if lad and cur < lad[-1] and self.grow_pays(i, cur, next(d for d in lad if d > cur)):
                    job = jobs[i]
                    heap.append((not self.below_promise(i), -_rank(job.tier),
                                 self.norm(job.account), job.submit_time, job.job_id, i))
        heapq.heapify(heap)
        while heap and self.free > 0:
            entry = heapq.heappop(heap)
            i = entry[-1]
            job = jobs[i]
            acct = job.account
            norm = self.norm(acct)
            if norm > entry[2] + _EPS:
                heapq.heappush(heap, entry[:2] + (norm,) + entry[3:])
                continue
            cur = self.tgt[i]
            lad = self.lad(i)
            nxt = next(d for d in lad if d > cur)
            if (nxt - cur > self.free or nxt - cur > self.quota_left(acct)
                    or not self.grow_pays(i, cur, nxt)):
                continue
            self.set_target(i, nxt)
            if i not in self.granted or i in self.victim_of:
                self.granted[i] = (
                    f"grow to {nxt} of MAX={job.max_devices}: idle GPUs go to elastic jobs "
                    f"below MAX, {'below-promise jobs first, ' if not entry[0] else ''}then "
                    f"higher tiers, then the account with the lowest usage per fair-share "
                    f"weight (tier {job.tier.value}; account {acct}: {self.usage[acct]} GPUs, "
                    f"weight {self.weight[acct]:g})")
            if nxt < lad[-1]:
                heapq.heappush(heap, entry[:2] + (self.norm(acct),) + entry[3:])

    # -- output -------------------------------------------------------------

    def _actions(self) -> tuple[Action, ...]:
        jobs = self.jobs
        frees, takes = [], []
        for i in self.touched:
            before, after = jobs[i].devices, self.tgt[i]
            if after < before:
                frees.append(i)
            elif after > before:
                takes.append(i)
        out: list[Action] = []
        if frees or takes:
            pool = NodePool(self.state.nodes)
            for i in frees:
                job = jobs[i]
                placement = pool.release(job.placement, job.devices - self.tgt[i])
                out.append(self._free_action(i, placement))
            for i in takes:
                job = jobs[i]
                placement = pool.take(job.placement, self.tgt[i] - job.devices)
                kind = ActionKind.START if job.devices == 0 else ActionKind.GROW
                out.append(Action(kind, job.job_id, job.devices, self.tgt[i],
                                  self.granted[i], placement))
        if self.explain:
            for r in (2, 1, 0):
                for i in self.pending[r]:
                    if not self.tgt[i]:
                        out.append(Action(ActionKind.LEAVE, jobs[i].job_id, 0, 0,
                                          "pending: " + self._why_waiting(i, r)))
        return tuple(out)

    def _why_waiting(self, i: int, r: int) -> str:
        if i in self.waiting:
            return self.waiting[i]
        victims = "/".join(_RANK_TIER[v].value for v in self.victim_ranks[r]) or "no lower-tier"
        spared = (f" (jobs started or resized in the last {self.settings.min_run_s:g} s are "
                  f"spared)" if self.settings.min_run_s > 0 and r != self.top else "")
        lad = self.start_ladder(i) if self.lad(i) else ()
        return (f"needs {lad[0] if lad else '?'} GPUs; {self.free} free, and "
                f"{victims} jobs (the tiers that may be shrunk or preempted for "
                f"{_RANK_TIER[r].value}) have no more to give{spared}")

    def _free_action(self, i: int, placement: tuple[tuple[str, int], ...]) -> Action:
        job = self.jobs[i]
        req, kind = self.victim_of[i]
        rj = self.jobs[req]
        more = self.victim_count[i] - 1
        tail = f" (and {more} more)" if more > 0 else ""
        if kind == "own":
            why = (f"account {job.account} is at its gpu_quota of {self.quota[job.account]} "
                   f"GPUs and its own job {rj.job_id} ({rj.tier.value}) needs them{tail}; "
                   f"tiers.{job.tier.value}.preemptible_by includes {rj.tier.value}")
        elif kind == "las":
            why = (f"job {rj.job_id} of the same tier {rj.tier.value}, which promises no GPU "
                   f"fraction, has had less GPU time ({self.attained(req):,.0f} GPU-s against "
                   f"{self.attained(i):,.0f}): least attained service first{tail}")
        elif kind == "loan" and rj.account != job.account and self.fair:
            why = (f"devices above its promised size were on loan from idle GPUs; job "
                   f"{rj.job_id} of the same tier {rj.tier.value} in account {rj.account}, "
                   f"below its fair share against {job.account}, needs them (a fair-share "
                   f"correction: hysteresis does not hold it){tail}")
        elif kind == "loan":
            why = (f"devices above its promised size were on loan from idle GPUs; job "
                   f"{rj.job_id} of the same tier {rj.tier.value} in account {rj.account} "
                   f"needs them{tail}")
        else:
            why = (f"job {rj.job_id} ({rj.tier.value}) needs GPUs{tail} and "
                   f"tiers.{job.tier.value}.preemptible_by includes {rj.tier.value}")
        size = self.tgt[i]
        if size == 0:
            return Action(ActionKind.PREEMPT, job.job_id, job.devices, 0,
                          f"preempt (checkpoint and requeue): {why}; shrinking lower tiers to "
                          f"their MIN was not enough", (), rj.job_id)
        floor = "its MIN" if size == self.min_floor(i) else f"{size}"
        return Action(ActionKind.SHRINK, job.job_id, job.devices, size,
                      f"shrink to {floor} (elastic {job.min_devices}:{job.max_devices}, "
                      f"W={job.world_size}): {why}", placement, rj.job_id)
