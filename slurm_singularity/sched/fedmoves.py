"""Moves of running jobs between the members of a federation: which running
job leaves a full cluster, and for where, so that a higher tier's pending
job can start there without a job being preempted or shrunk in place.

Why a module of its own: ``federation.place`` decides where *pending* jobs
go and its ranking changes on its own; this decision reads the same member
states but different facts (what runs, since when, whose checkpoint lies
where, what is already leaving), and the placer carries its result out
through the migration steps of ``migrate.py``. It is pure: states in, moves
out, so it is tested on hand-made federations without a cluster.

The rules, in order:

* A *need* is a pending job, not held, that fits on none of its viable
  member clusters, counting the free GPUs of each, the room taken by the
  jobs placed in the same pass and the GPUs of the jobs already leaving
  (migrations in flight): a need that fits once they have left gets no
  further move, so one need never moves a job twice, and a placer restarted
  mid-migration adds none. Needs are served highest tier first, then oldest.
* A job may be moved for a need only if it runs on that cluster, the
  policy lets the need's tier preempt its tier (``preemptible_by``, with a
  ``preempt_mode`` that checkpoints: requeue), it has run at least
  ``MoveSettings.min_run_s`` since it last started (hysteresis: a job moved
  a moment ago has just started again on its destination, so it is not
  moved again), its checkpoint lies in the storage of the cluster it runs on
  (a job without one would start over elsewhere: nothing to gain over
  preemption), and the copy of that checkpoint takes at most
  ``MoveCost.max_copy_s`` at ``MoveCost.bytes_per_s``.
* Candidates are taken lowest tier first, then smallest checkpoint (the
  cheapest copy), until the need fits; jobs that turn out not to be needed
  are put back. Each moved job needs a destination, another member with
  room for its nodes x GPUs, the one left with the most free GPUs. If the
  need cannot be made to fit, nothing is moved for it (no job is disturbed
  for nothing); among its viable members the one whose moves copy the
  fewest bytes wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from ..policy.api import Policy, PreemptMode
from .api import ClusterState, JobPhase, JobState
from .federation import MoveCost, PendingJob, Placement, _fits, _take


@dataclass(frozen=True)
class MoveSettings:
    """How eagerly the placer moves running jobs."""

    #: Hysteresis, seconds (default 600, range 0 to 1e6; 0 = off): a job that
    #: started (or was moved, which starts it again) less than this long ago
    #: is not moved. ``singularity-schedd --min-run``.
    min_run_s: float = 600.0
    #: Seconds a signalled job has to checkpoint and be requeued (default
    #: 300, range 1 to 86400) before the placer gives the move up and leaves
    #: the job where it runs. ``singularity-schedd --requeue-timeout``.
    requeue_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for name, flag, lo, hi in (("min_run_s", "--min-run", 0, 1e6),
                                   ("requeue_timeout_s", "--requeue-timeout", 1, 86400)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise ValueError(f"{name} ({flag}) must be a number of seconds between "
                                 f"{lo:g} and {hi:g}, not {v!r}")


@dataclass(frozen=True)
class Leaving:
    """A migration in flight: its job leaves ``source`` for ``destination``."""

    job_id: int
    source: str
    destination: str
    #: The job's shape: nodes, and GPUs on each.
    nodes: int
    gpus_per_node: int


@dataclass(frozen=True)
class Move:
    """Move the running job ``job_id`` from ``source`` to ``destination``
    (checkpoint, requeue held, narrow, copy, release) to make room for the
    pending job ``for_job``."""

    job_id: int
    source: str
    destination: str
    for_job: int
    #: Bytes of its checkpoint (what the move copies).
    checkpoint_bytes: int
    reason: str


def plan_moves(members: Mapping[str, ClusterState], pending: Sequence[PendingJob],
               placed: Sequence[Placement], checkpoints: Mapping[int, int],
               in_flight: Sequence[Leaving], policy: Policy, now: float,
               cost: MoveCost = MoveCost(), settings: MoveSettings = MoveSettings()
               ) -> tuple[Move, ...]:
    """The moves to make now (see the module docstring). ``checkpoints``:
    running job id -> bytes of its checkpoint in the storage of the member
    it runs on (a job absent has none there). ``placed``: this pass's
    placements of ``pending`` jobs, which take their room first."""
    free = {name: {n.name: n.free_gpus for n in state.nodes} for name, state in members.items()}
    shapes = {j.job_id: j for j in pending}
    for p in placed:
        job = shapes.get(p.job_id)
        if job is not None and p.cluster in free:
            _take_named(free[p.cluster], job.nodes, job.gpus_per_node)
    leaving = {f.job_id for f in in_flight}
    for f in in_flight:
        running = _running(members.get(f.source), f.job_id)
        if running is not None:
            _give_back(free[f.source], running)
        if f.destination in free:
            _take_named(free[f.destination], f.nodes, f.gpus_per_node)
    done = {p.job_id for p in placed} | leaving
    needs = sorted((j for j in pending if not j.held and j.job_id not in done),
                   key=lambda j: (-j.tier.rank, j.submit_time, j.job_id))
    moves: list[Move] = []
    for need in needs:
        viable = [m for m in need.viable if m in free]
        home = next((m for m in viable if _fits(list(free[m].values()), need)), None)
        if home is not None:
            _take_named(free[home], need.nodes, need.gpus_per_node)   # it starts there
            continue
        plans = [(m, plan) for m in viable
                 if (plan := _plan_for(need, m, members[m], free, checkpoints, leaving, policy,
                                       now, cost, settings)) is not None]
        if not plans:
            continue
        cluster, plan = min(plans, key=lambda mp: (sum(mv.checkpoint_bytes for mv in mp[1]),
                                                   len(mp[1]), viable.index(mp[0])))
        for mv in plan:
            job = _running(members[cluster], mv.job_id)
            _give_back(free[cluster], job)
            _take_named(free[mv.destination], len(job.placement), _per_node(job))
            leaving.add(mv.job_id)
        _take_named(free[cluster], need.nodes, need.gpus_per_node)
        moves += plan
    return tuple(moves)


def _plan_for(need: PendingJob, cluster: str, state: ClusterState,
              free: dict[str, dict[str, int]], checkpoints: Mapping[int, int],
              leaving: set[int], policy: Policy, now: float, cost: MoveCost,
              settings: MoveSettings) -> list[Move] | None:
    """The moves that make ``need`` fit on ``cluster``; None if none do."""
    candidates = sorted(
        (j for j in state.jobs if _movable(j, need, checkpoints, leaving, policy, now, cost,
                                           settings)),
        key=lambda j: (j.tier.rank, checkpoints[j.job_id], j.job_id))
    here = dict(free[cluster])
    chosen: list[JobState] = []
    for job in candidates:
        if _fits(list(here.values()), need):
            break
        chosen.append(job)
        _give_back(here, job)
    if not _fits(list(here.values()), need):
        return None
    for job in reversed(chosen[:-1]):            # the last one was needed
        trial = dict(here)
        for node, gpus in job.placement:
            trial[node] -= gpus
        if _fits(list(trial.values()), need):
            chosen.remove(job)
            here = trial
    rooms = {m: sorted(f.values(), reverse=True) for m, f in free.items() if m != cluster}
    moves = []
    for job in chosen:
        shape = PendingJob(job.job_id, job.tier, job.account, len(job.placement),
                           _per_node(job), 0.0, ())
        fit = [m for m in rooms if _fits(rooms[m], shape)]
        if not fit:
            return None
        dest = max(fit, key=lambda m: (sum(rooms[m]), m))
        _take(rooms[dest], shape)
        size = checkpoints[job.job_id]
        moves.append(Move(
            job.job_id, cluster, dest, need.job_id, size,
            f"makes room on {cluster} for job {need.job_id} ({need.tier.value}, "
            f"{need.nodes}x{need.gpus_per_node} GPUs); {dest} has room for its "
            f"{shape.nodes}x{shape.gpus_per_node}: copy {size} bytes (~{cost.seconds(size):.1f} s)"))
    return moves


def _movable(job: JobState, need: PendingJob, checkpoints: Mapping[int, int], leaving: set[int],
             policy: Policy, now: float, cost: MoveCost, settings: MoveSettings) -> bool:
    spec = policy.tiers.get(job.tier)
    return (job.phase is JobPhase.RUNNING and bool(job.placement)
            and job.job_id not in leaving
            and spec is not None and need.tier in spec.preemptible_by
            and spec.preempt_mode is PreemptMode.REQUEUE
            and (job.sized_at is None or now - job.sized_at >= settings.min_run_s)
            and job.job_id in checkpoints
            and cost.seconds(checkpoints[job.job_id]) <= cost.max_copy_s)


def _running(state: ClusterState | None, job_id: int) -> JobState | None:
    if state is None:
        return None
    return next((j for j in state.jobs if j.job_id == job_id and j.devices
                 and j.phase is not JobPhase.PENDING), None)


def _per_node(job: JobState) -> int:
    return max(g for _, g in job.placement)


def _give_back(free: dict[str, int], job: JobState) -> None:
    for node, gpus in job.placement:
        free[node] = free.get(node, 0) + gpus


def _take_named(free: dict[str, int], nodes: int, gpus_per_node: int) -> None:
    """Take ``nodes`` x ``gpus_per_node`` from the nodes that fit most tightly
    (as ``federation._take``, keeping the node names)."""
    for _ in range(nodes):
        fit = [n for n, f in free.items() if f >= gpus_per_node]
        if not fit:
            return
        n = min(fit, key=lambda k: (free[k], k))
        free[n] -= gpus_per_node
