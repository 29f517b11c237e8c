"""Observe: turn what Slurm reports into the planner's ``ClusterState``.

Why shaped so: the daemon keeps no state of its own (invariant 5). All it
needs to survive a restart lives in Slurm: the job tag that job_submit.lua
wrote into ``AdminComment`` (tier, elastic range, world size) and the
daemon's own marks appended to it, read as one typed record
(``slurm/admin_comment.py``, ``marks.py``). Killed at any moment, the
daemon reads the same marks back and carries on without repeating an action;
the journal (``journal.py``) covers the updates slurmctld had not saved yet
when it was killed itself.

What the daemon trusts: only what a user cannot write. The tier, range and
marks come from the project's own tag (job_submit.lua writes it; users cannot
set AdminComment), and a tag that does not parse whole, or names an unknown
tier, is refused whole. A pending job is demand unless it is held or waits
for a begin time; a begin-time wait is cut short only for a job that the
daemon or Slurm's preemption requeued (``requeued_by_slurm``), never for a
user's ``--begin``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Iterable

from ..policy.api import Policy, Tier
from ..slurm.api import Job, Node, SlurmState
from .api import ClusterState, JobPhase, JobState, NodeState
from .journal import Journal, intent, merge, same_run
from .marks import AdminCommentError, Marks, ResizeStep, read_marks

__all__ = ["JobView", "Marks", "Observation", "ResizeStep", "observe", "read_marks"]

log = logging.getLogger(__name__)

#: Pending reasons of a job that does not want to start now: held by its
#: user or an admin (priority 0), so it is no demand.
HELD_REASONS = {"JobHeldUser", "JobHeldAdmin", "JobHeld"}


@dataclass(frozen=True)
class JobView:
    """What the executor needs to know of a job beyond the planner's state."""

    job: Job
    marks: Marks               # the marks to act on (Slurm's, brought forward by the journal)
    tier: Tier
    world_size: int
    devices: int               # held now (running) or requested (pending)
    requested: int             # GPUs the job's Slurm request asks for
    elastic: tuple[int, int] | None = None   # from the job tag; None: rigid
    #: The job carries a valid job tag of the project's: only such a job is
    #: marked, signalled, resized or preempted by the daemon.
    tagged: bool = False
    #: The marks as Slurm shows them (differ from ``marks`` when Slurm lost
    #: an update that the journal holds).
    slurm_marks: Marks | None = None
    #: Pending, and waits for Slurm's requeue delay after a requeue by the
    #: daemon or by Slurm's preemption: the daemon may let it start now.
    requeued: bool = False
    #: Pending but not demand: held, or waiting for a begin time of its own.
    waiting: bool = False
    #: The step of ``marks`` that the journal holds as about to be taken and
    #: nothing shows as taken (the daemon stopped around its Slurm call):
    #: the executor takes it again at once (``journal.intent``).
    intent: ResizeStep | None = None


@dataclass(frozen=True)
class Observation:
    state: ClusterState
    views: dict[int, JobView]


def node_states(nodes: Iterable[Node], used: dict[str, int]) -> tuple[NodeState, ...]:
    out = []
    for n in nodes:
        if n.state.split("+")[0] in ("down", "drained", "draining", "fail", "unknown"):
            continue
        out.append(NodeState(n.name, n.gpus, max(0, n.gpus - used.get(n.name, 0))))
    return tuple(out)


#: Most seconds between a job's requeue and the time Slurm lets it start
#: again (cred_expire + 1; cred_expire is 120 s by default). A pending job
#: that may start later than that was given its begin time by someone (a
#: user's ``--begin`` or ``scontrol update StartTime``), not by the requeue.
REQUEUE_DELAY_MAX_S = 130.0


def requeued_by_slurm(job: Job) -> bool:
    """Whether a pending job waits only for Slurm's requeue delay: it was
    requeued (a requeue resets ``submit_time`` to the requeue time) and its
    eligible time is no later than that delay. A user who requeues a job and
    sets a later StartTime fails the second test; no user can set the
    restart count or the submit time."""
    return (job.restart_count > 0 and job.submit_time > 0
            and job.eligible_time - job.submit_time <= REQUEUE_DELAY_MAX_S)


def is_held(job: Job) -> bool:
    return job.reason in HELD_REASONS or job.priority == 0 or job.state == SlurmState.REQUEUE_HOLD


def observe(jobs: Iterable[Job], nodes: Iterable[Node], policy: Policy,
            now: float, *, journal: Journal | None = None,
            warned: set[int] | None = None) -> Observation:
    """Build the planner's state. Jobs without GPUs are not the planner's
    business and are left out; a job without a valid job tag is rigid at the
    GPUs it asked for, in the tier of its partition. A held job, and a job
    that waits for a begin time that is not a requeue's, is not demand
    (phase HELD). ``journal`` brings the marks Slurm shows forward (see
    ``journal.merge``); ``warned`` holds the jobs whose tag was already
    found bad, so that each is reported once."""
    used: dict[str, int] = {}
    states: list[JobState] = []
    views: dict[int, JobView] = {}
    warned = set() if warned is None else warned
    for job in jobs:
        running, pending = job.state.running, job.state.pending
        if not (running or pending):
            continue
        requested = job.gpus
        placement = job.placement if running else ()
        held = sum(g for _, g in placement) if placement else (requested if running else 0)
        for name, g in placement:
            used[name] = used.get(name, 0) + g
        view = _view(job, policy, held if running else requested, requested, warned)
        if view is None:
            continue
        if journal is not None and view.tagged:
            view = _with_journal(view, journal, running)
        if pending:
            # the daemon's own requeues pass the same test: no mark of ours
            # lets a begin time a user set afterwards be overridden
            requeued = job.reason == "BeginTime" and requeued_by_slurm(job)
            waiting = is_held(job) or (job.reason == "BeginTime" and not requeued)
            view = replace(view, requeued=requeued, waiting=waiting)
        views[job.job_id] = view
        state = _job_state(view, running, held, placement, now, policy)
        size = restart_size(view, pending, now)
        if size and not state.world_size % size and state.phase is not JobPhase.RUNNING:
            state = replace(state, restart_size=size)
        states.append(state)
    return Observation(ClusterState(now, node_states(nodes, used), tuple(states)), views)


def restart_size(view: JobView, pending: bool, now: float) -> int:
    """The size of the daemon's resize in flight on this job (0: none),
    for ``JobState.restart_size``: the size in its resize mark while it runs
    or has just been requeued, and, once the mark is cleared, its request if
    it was requeued for that resize (``Marks.resized``) and has not run
    again. The planner then starts it at that size only, keeps the GPUs a
    grow goes to, and holds its account's fair-share corrections until it
    runs, as the simulator keeps a resized job at its new size. Otherwise
    the job would be started at its MAX again, its account would look short
    of its share meanwhile, and each resize would undo the last. A requeued
    job counts so for ``REQUEUE_DELAY_MAX_S`` after its requeue (which
    resets ``submit_time``); one that has not started by then is pending
    like any other."""
    job, marks = view.job, view.marks
    if not view.tagged or view.waiting:
        return 0
    if marks.resize_to is not None:
        return marks.resize_to
    if (pending and marks.resized == view.requested and job.restart_count > 0
            and now - job.submit_time <= REQUEUE_DELAY_MAX_S):
        return view.requested
    return 0


def _with_journal(view: JobView, journal: Journal, running: bool) -> JobView:
    entry = journal.get(view.job.job_id)
    if entry is None or not same_run(entry, running, view.job.start_time,
                                     view.job.restart_count):
        return view
    return replace(view, marks=merge(view.marks, entry), intent=intent(view.marks, entry))


def _short(text: str, limit: int = 60) -> str:
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def _view(job: Job, policy: Policy, devices: int, requested: int,
          warned: set[int]) -> JobView | None:
    if requested <= 0 and devices <= 0:
        return None
    marks: Marks | None = None
    try:
        marks = read_marks(job.admin_comment)
        if marks.job_tag is not None:
            Tier(marks.job_tag.sla)
    except (AdminCommentError, ValueError) as exc:
        if job.job_id not in warned:
            warned.add(job.job_id)
            why = (f"unknown tier {_short(marks.job_tag.sla)}" if marks is not None
                   and marks.job_tag is not None else str(exc)[:300])
            log.warning("[job %s] job tag refused, the job is treated as untagged "
                        "(rigid, tier of its partition; the daemon will not resize or "
                        "preempt it): %s", job.job_id, why)
        marks = None
    if marks is None or marks.job_tag is None:
        # not the project's tag: its text is someone else's, and holds no marks
        tier = policy.tier_of_partition(job.partition) or policy.defaults.tier
        return JobView(job, marks if marks is not None else Marks(""), tier, max(requested, 1), devices,
                       requested, None, tagged=False, slurm_marks=None)
    tag = marks.job_tag
    return JobView(job, marks, Tier(tag.sla), max(tag.world_size, 1), devices, requested,
                   tag.elastic, tagged=True, slurm_marks=marks)


def _job_state(view: JobView, running: bool, held: int,
               placement: tuple[tuple[str, int], ...], now: float, policy: Policy) -> JobState:
    job = view.job
    lo, hi = view.elastic or (view.requested, view.requested)
    world = view.world_size
    lo, hi = min(lo, world), min(hi, world)
    if running:
        phase = JobPhase.RESIZING if view.marks.resize_to is not None else JobPhase.RUNNING
    else:
        phase = JobPhase.HELD if view.waiting else JobPhase.PENDING
    start = (job.start_time or now) if running else now
    rate = held / world if running and held else 0.0
    work = view.marks.work_s + rate * max(0.0, now - start)
    devices = held if running else 0
    if devices and world % devices:
        # a job that does not follow the rules (no job tag): treat it as rigid
        world = devices
        lo = hi = devices
    # a job's Slurm account outside the policy falls under the policy's
    # default account, as job_submit.lua treats it
    account = job.account if job.account in policy.accounts else (
        policy.defaults.account or job.account or "default")
    return JobState(
        job_id=job.job_id, tier=view.tier, account=account, world_size=world,
        min_devices=max(1, min(lo, hi)), max_devices=max(1, hi), phase=phase,
        submit_time=job.submit_time or now, devices=devices,
        placement=placement if devices and sum(g for _, g in placement) == devices else (),
        work_done_s=work, work_as_of=now,
        # every start and every resize (a requeue at the new size) restarts
        # the job, so its last start is when it was last sized: the planner's
        # hysteresis (PlannerSettings.min_run_s) counts from it, as in the simulator
        sized_at=start if running else None)
