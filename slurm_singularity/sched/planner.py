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
   jobs of one account in submission order; an account never goes above its
   ``gpu_quota``.
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
3. **Idle GPUs to elastic jobs.** What is still free goes, one legal step at
   a time, to running jobs below MAX: jobs below their promised GPU fraction
   first, then higher tiers, then the account with the lowest weighted usage.

Every size given divides the job's world size ``W``, lies in its elastic
range and keeps ``W/D`` within ``policy.elastic.max_splice_factor``. The
output is ordered (preemptions and shrinks, then starts and grows, each in the
order decided) and depends only on the input, so the daemon and the simulator
replay the same decisions.
"""

from __future__ import annotations

import heapq
import logging
from functools import lru_cache

from ..policy.api import Policy, Tier
from .api import Action, ActionKind, ClusterState, JobPhase, SchedError
from .placement import NodePool

log = logging.getLogger(__name__)

_EPS = 1e-9
_TIERS_HIGH_FIRST = sorted(Tier, key=lambda t: -t.rank)


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


def plan(state: ClusterState, policy: Policy, *, explain_waiting: bool = False) -> tuple[Action, ...]:
    """Decide what to do now.

    :param explain_waiting: also return a LEAVE action, with the reason, for
        every pending job that is not started (for ``job explain``).
    :raises SchedError: a job's tier is missing from the policy.
    """
    return _Pass(state, policy, explain_waiting).run()


class _Pass:
    """The working state of one planning pass (arrays indexed by job)."""

    def __init__(self, state: ClusterState, policy: Policy, explain: bool) -> None:
        self.state = state
        self.policy = policy
        self.explain = explain
        self.now = now = state.now
        self.free = state.free_gpus
        splice = policy.elastic.max_splice_factor
        specs = policy.tiers
        self.promise = {t: s.gpu_fraction for t, s in specs.items()}
        # victim tiers each tier may shrink/preempt, lowest rank first
        self.victim_tiers = {
            r: [t for t in sorted(specs, key=lambda t: t.rank) if r in specs[t].preemptible_by]
            for r in specs}
        accounts = policy.accounts
        self.weight: dict[str, float] = {}
        self.quota: dict[str, int | None] = {}
        self.usage: dict[str, int] = {}

        jobs = state.jobs
        self.jobs = jobs
        n = len(jobs)
        self.tgt = [0] * n
        self.ladder: list[tuple[int, ...]] = [()] * n
        self.running: list[int] = []
        self.pending: list[int] = []
        usage = self.usage
        running_phase, pending_phase = JobPhase.RUNNING, JobPhase.PENDING
        for i, job in enumerate(jobs):
            phase = job.phase
            if phase.terminal:
                continue
            if job.tier not in specs:
                raise SchedError(f"job {job.job_id}: tier {job.tier.value!r} is not in the policy")
            acct = job.account
            if acct not in self.weight:
                spec = accounts.get(acct)
                self.weight[acct] = spec.fair_share_weight if spec else 1.0
                self.quota[acct] = spec.gpu_quota if spec else None
                usage[acct] = 0
            d = job.devices
            usage[acct] += d
            self.ladder[i] = legal_sizes(job.world_size, job.min_devices, job.max_devices, splice)
            if phase is running_phase:
                self.tgt[i] = d
                self.running.append(i)
            elif phase is pending_phase:
                self.pending.append(i)
        self.start_norm = {a: usage[a] / self.weight[a] for a in usage}
        self.frac: dict[int, float] = {}
        # decisions, for reasons: job -> (requester, via) for victims; job -> text for takers
        self.victim_of: dict[int, tuple[int, str]] = {}
        self.victim_count: dict[int, int] = {}
        self.granted: dict[int, str] = {}
        self.waiting: dict[int, str] = {}
        self.touched: dict[int, None] = {}

    # -- helpers ------------------------------------------------------------

    def fraction(self, i: int) -> float:
        f = self.frac.get(i)
        if f is None:
            f = self.frac[i] = self.jobs[i].gpu_fraction(self.now)
        return f

    def below_promise(self, i: int) -> bool:
        return self.fraction(i) < self.promise[self.jobs[i].tier] - _EPS

    def min_floor(self, i: int) -> int:
        lad = self.ladder[i]
        return min(lad[0], self.tgt[i]) if lad else self.tgt[i]

    def promise_floor(self, i: int) -> int:
        job = self.jobs[i]
        lad = self.ladder[i]
        if not lad:
            return self.tgt[i]
        return min(self.tgt[i], max(lad[0], promised_size(lad, job.world_size, self.promise[job.tier])))

    def norm(self, acct: str) -> float:
        return self.usage[acct] / self.weight[acct]

    def quota_left(self, acct: str) -> int:
        q = self.quota[acct]
        return 1 << 60 if q is None else q - self.usage[acct]

    def set_target(self, i: int, size: int) -> None:
        acct = self.jobs[i].account
        self.usage[acct] += size - self.tgt[i]
        self.free -= size - self.tgt[i]
        self.tgt[i] = size
        self.touched[i] = None

    # -- the pass -----------------------------------------------------------

    def run(self) -> tuple[Action, ...]:
        self.pool: dict[Tier, list[int]] | None = None
        if self.pending or self.running:
            for tier in _TIERS_HIGH_FIRST:
                if tier in self.promise:
                    self._serve_tier(tier)
            if self.free > 0:
                self._grow_idle()
        return self._actions()

    def _victim_pools(self) -> None:
        """Per tier: running jobs in the order they give up devices."""
        jobs = self.jobs
        norm = self.start_norm
        by_tier: dict[Tier, list[int]] = {t: [] for t in self.promise}
        for i in self.running:
            by_tier[jobs[i].tier].append(i)
        self.pool = {}
        self.cap_shrink: dict[Tier, int] = {}
        self.cap_loan: dict[Tier, int] = {}
        self.cap_whole: dict[Tier, int] = {}
        for t, members in by_tier.items():
            members.sort(key=lambda i: (self.below_promise(i), -norm[jobs[i].account],
                                        -(self.fraction(i) - self.promise[t]),
                                        -jobs[i].submit_time, -jobs[i].job_id))
            self.pool[t] = members
            self.cap_shrink[t] = sum(self.tgt[i] - self.min_floor(i) for i in members)
            self.cap_loan[t] = sum(self.tgt[i] - self.promise_floor(i) for i in members)
            self.cap_whole[t] = sum(self.tgt[i] for i in members)
        self.cursor = {(t, k): 0 for t in by_tier for k in ("shrink", "loan", "whole")}

    def _demands(self, tier: Tier) -> dict[str, list[tuple[int, int, int]]]:
        """Per account, in order: (job, smallest useful size, wanted size)."""
        jobs = self.jobs
        promise = self.promise[tier]
        out: dict[str, list[tuple[float, int, int, int, int]]] = {}
        for i in self.running:
            job = jobs[i]
            if job.tier is not tier or not self.ladder[i]:
                continue
            lad = self.ladder[i]
            want = promised_size(lad, job.world_size, promise)
            if self.tgt[i] < want:
                step = next(d for d in lad if d > self.tgt[i])
                out.setdefault(job.account, []).append((0, job.submit_time, job.job_id, i, step, want))
        for i in self.pending:
            job = jobs[i]
            if job.tier is not tier:
                continue
            lad = self.ladder[i]
            if not lad:
                self.waiting[i] = (f"no device count in the elastic range {job.min_devices}:"
                                   f"{job.max_devices} divides W={job.world_size} within splice "
                                   f"factor {self.policy.elastic.max_splice_factor}")
                continue
            want = max(lad[0], promised_size(lad, job.world_size, promise))
            out.setdefault(job.account, []).append((1, job.submit_time, job.job_id, i, lad[0], want))
        return {a: [(e[3], e[4], e[5]) for e in sorted(lst)] for a, lst in out.items()}

    def _serve_tier(self, tier: Tier) -> None:
        demands = self._demands(tier)
        if not demands:
            return
        heap = [(self.norm(a), a, 0) for a in demands]
        heapq.heapify(heap)
        while heap:
            _, acct, k = heapq.heappop(heap)
            i, least, want = demands[acct][k]
            self._serve(tier, i, least, want)
            if k + 1 < len(demands[acct]):
                heapq.heappush(heap, (self.norm(acct), acct, k + 1))

    def _serve(self, tier: Tier, i: int, least: int, want: int) -> None:
        job = self.jobs[i]
        cur = self.tgt[i]
        lad = self.ladder[i]
        room = self.quota_left(job.account) + cur
        if least > room:
            self.waiting[i] = (f"account {job.account} is at its gpu_quota of "
                               f"{self.quota[job.account]} GPUs")
            return
        want = max(d for d in lad if d <= max(least, min(want, room)))
        if self.free >= want - cur:
            self.set_target(i, want)
            self.granted[i] = self._grant_text(i, cur, want, "free GPUs")
            return
        reach = self.free + self._reclaimable(tier, job.account, want - cur - self.free)
        size = max((d for d in lad if cur < d and d - cur <= reach), default=0)
        if size < least:
            if cur == 0:
                self.waiting[i] = (f"needs {least} GPUs; {self.free} free and no "
                                   f"{'/'.join(t.value for t in self.victim_tiers[tier]) or 'lower-tier'}"
                                   f" job may be shrunk or preempted for {tier.value}")
            return
        need = size - cur - self.free
        taken = self._reclaim(tier, i, need) if need > 0 else "free GPUs"
        self.set_target(i, size)
        self.granted[i] = self._grant_text(i, cur, size, taken)

    def _grant_text(self, i: int, cur: int, size: int, source: str) -> str:
        job = self.jobs[i]
        p = self.promise[job.tier]
        verb = "start" if cur == 0 else "grow"
        return (f"{verb} at {size} of W={job.world_size} (elastic {job.min_devices}:"
                f"{job.max_devices}): tier {job.tier.value} promises {p:.0%} GPU fraction, "
                f"promised size {promised_size(self.ladder[i], job.world_size, p)}; "
                f"account {job.account} holds {self.usage[job.account]} GPUs "
                f"(weight {self.weight[job.account]:g}); GPUs from {source}")

    def _stages(self, tier: Tier):
        for t in self.victim_tiers[tier]:
            yield t, "shrink"
        yield tier, "loan"
        for t in self.victim_tiers[tier]:
            yield t, "whole"

    def _floor(self, i: int, kind: str) -> int:
        if kind == "shrink":
            return self.min_floor(i)
        if kind == "loan":
            return self.promise_floor(i)
        return 0

    def _reclaimable(self, tier: Tier, acct: str, need: int) -> int:
        """How much stages (a)-(c) could free for a demand, counting up to ``need``."""
        if self.pool is None:
            self._victim_pools()
        bound = self.cap_loan[tier] + sum(self.cap_whole[t] for t in self.victim_tiers[tier])
        if bound < 1:
            return 0
        got = 0
        my_norm = self.norm(acct)
        for t, kind in self._stages(tier):
            pool = self.pool[t]
            for pos in range(self.cursor[t, kind], len(pool)):
                v = pool[pos]
                if kind == "loan" and self.start_norm[self.jobs[v].account] < my_norm:
                    break
                if kind == "whole":
                    got += min(self.tgt[v], self.min_floor(v))
                else:
                    got += max(0, self.tgt[v] - self._floor(v, kind))
                if got >= need:
                    return got
        return got

    def _reclaim(self, tier: Tier, i: int, need: int) -> str:
        """Free at least ``need`` GPUs for job ``i`` along the stages; say how."""
        counts = {"shrink": 0, "loan": 0, "whole": 0}
        my_norm = self.norm(self.jobs[i].account)
        for t, kind in self._stages(tier):
            if need <= 0:
                break
            pool = self.pool[t]
            pos = self.cursor[t, kind]
            while pos < len(pool) and need > 0:
                v = pool[pos]
                if kind == "loan" and self.start_norm[self.jobs[v].account] < my_norm:
                    break
                cur = self.tgt[v]
                floor = self._floor(v, kind)
                if cur <= floor:
                    pos += 1
                    continue
                size = floor
                if kind != "whole":
                    size = max((d for d in self.ladder[v] if floor <= d < cur and cur - d >= need),
                               default=floor)
                freed = cur - size
                self.cap_whole[t] -= freed
                self.cap_shrink[t] -= freed - max(0, self.min_floor(v) - size)
                self.cap_loan[t] -= max(0, cur - max(size, self.promise_floor(v)))
                self.set_target(v, size)
                self.victim_of.setdefault(v, (i, kind))
                self.victim_count[v] = self.victim_count.get(v, 0) + 1
                counts[kind] += 1
                need -= freed
                if size <= floor:
                    pos += 1
            self.cursor[t, kind] = pos
        parts = [f"{counts['shrink']} lower-tier job(s) shrunk"] if counts["shrink"] else []
        if counts["loan"]:
            parts.append(f"{counts['loan']} loan(s) of {tier.value} jobs taken back")
        if counts["whole"]:
            parts.append(f"{counts['whole']} lower-tier job(s) preempted")
        return "free GPUs and " + ", ".join(parts)

    def _grow_idle(self) -> None:
        jobs = self.jobs
        heap = []
        for i in list(self.running) + [i for i in self.pending if self.tgt[i]]:
            lad = self.ladder[i]
            if self.tgt[i] and lad and self.tgt[i] < lad[-1]:
                job = jobs[i]
                heap.append((not self.below_promise(i), -job.tier.rank, self.norm(job.account),
                             job.submit_time, job.job_id, i))
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
            nxt = next(d for d in self.ladder[i] if d > cur)
            if nxt - cur > self.free or nxt - cur > self.quota_left(acct):
                continue
            self.set_target(i, nxt)
            if i not in self.granted or i in self.victim_of:
                self.granted[i] = (f"grow to {nxt} of MAX={job.max_devices}: idle GPUs go to "
                                   f"elastic jobs below MAX, {'below-promise jobs first, ' if not entry[0] else ''}"
                                   f"then higher tiers, then the account with the lowest usage per "
                                   f"fair-share weight (account {acct}: {self.usage[acct]} GPUs, "
                                   f"weight {self.weight[acct]:g})")
            if nxt < self.ladder[i][-1]:
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
            pool = NodePool((n.name, n.gpus, n.free_gpus) for n in self.state.nodes)
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
            for i in self.pending:
                if not self.tgt[i]:
                    why = self.waiting.get(i, "waiting: not enough free GPUs this pass")
                    out.append(Action(ActionKind.LEAVE, jobs[i].job_id, 0, 0, "pending: " + why))
        return tuple(out)

    def _free_action(self, i: int, placement: tuple[tuple[str, int], ...]) -> Action:
        job = self.jobs[i]
        req, kind = self.victim_of[i]
        rj = self.jobs[req]
        more = self.victim_count[i] - 1
        tail = f" (and {more} more)" if more > 0 else ""
        if kind == "loan":
            why = (f"devices above its promised size were on loan from idle GPUs; job "
                   f"{rj.job_id} of the same tier {rj.tier.value} in account {rj.account} "
                   f"(usage per weight not above {job.account}'s) needs them{tail}")
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
