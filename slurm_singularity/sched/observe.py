"""Observe: turn what Slurm reports into the planner's ``ClusterState``.

Why shaped so: the daemon keeps no state of its own (invariant 5). All it
needs to survive a restart lives in Slurm: the job tag that job_submit.lua
wrote into ``AdminComment`` (tier, elastic range, world size) and the
daemon's own marks appended to it (``resize=D@t``: a resize in flight;
``work=S``: work seconds done in earlier runs). Killed at any moment, the
daemon reads the same marks back and carries on without repeating an action.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Iterable

from .. import contract
from ..policy.api import Policy, Tier
from ..slurm.api import Job, Node
from ..slurm.cli import gpus_in
from .api import ClusterState, JobPhase, JobState, NodeState

log = logging.getLogger(__name__)

_RESIZE = re.compile(r",resize=(\d+)@(\d+(?:\.\d+)?)")
_WORK = re.compile(r",work=(\d+(?:\.\d+)?)")
_UNSIGNALLED = re.compile(r",unsignalled\b")
_IDX = re.compile(r"^gpu(?::[^:(]+)?:(\d+)")

RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING"}
PENDING_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}


@dataclass(frozen=True)
class Marks:
    """The daemon's marks in a job's AdminComment."""

    tag: str                      # the job tag without the marks
    resize_to: int | None = None  # a resize to this size is in flight
    resize_at: float = 0.0        # when it was asked for (epoch seconds)
    work_s: float = 0.0           # work seconds done before the current run
    signalled: bool = True        # False: the job had no step to signal yet

    def render(self) -> str:
        out = self.tag
        if self.work_s:
            out += f",work={self.work_s:.1f}"
        if self.resize_to is not None:
            out += f",resize={self.resize_to}@{self.resize_at:.0f}"
            if not self.signalled:
                out += ",unsignalled"
        return out


def read_marks(admin_comment: str) -> Marks:
    text = admin_comment or ""
    resize = _RESIZE.search(text)
    work = _WORK.search(text)
    tag = _UNSIGNALLED.sub("", _WORK.sub("", _RESIZE.sub("", text)))
    return Marks(tag=tag,
                 resize_to=int(resize.group(1)) if resize else None,
                 resize_at=float(resize.group(2)) if resize else 0.0,
                 work_s=float(work.group(1)) if work else 0.0,
                 signalled=not _UNSIGNALLED.search(text))


@dataclass(frozen=True)
class JobView:
    """What the executor needs to know of a job beyond the planner's state."""

    job: Job
    marks: Marks
    tier: Tier
    world_size: int
    devices: int               # held now (running) or requested (pending)
    requested: int             # GPUs the job's Slurm request asks for
    elastic: tuple[int, int] | None = None   # from the job tag; None: rigid


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


def placement_of(job: Job) -> tuple[tuple[str, int], ...]:
    """(node, gpus) pairs of a running job from squeue's gres_detail."""
    detail = job.extra.get("gres_detail") or []
    res = job.extra.get("job_resources") or {}
    names = [n.get("nodename") for n in res.get("allocated_nodes", []) if isinstance(n, dict)]
    out = []
    for name, gres in zip(names, detail):
        m = _IDX.match(str(gres))
        if name and m and int(m.group(1)):
            out.append((name, int(m.group(1))))
    return tuple(out)


_REQ_GPUS = re.compile(r"(?:^|,)gres/gpu=(\d+)")


def requested_gpus(job: Job) -> int:
    """GPUs the job's request asks for in all. ``tres_req_str`` has the
    total after an update; a requeued job's ``node_count`` still shows its
    previous allocation until it starts again."""
    m = _REQ_GPUS.search(str(job.extra.get("tres_req_str") or ""))
    if m:
        return int(m.group(1))
    per_node = job.extra.get("tres_per_node")
    if per_node:
        return gpus_in(str(per_node)) * int(job.extra.get("node_count") or 1)
    return gpus_in(str(job.extra.get("tres_per_job") or ""))


def observe(jobs: Iterable[Job], nodes: Iterable[Node], policy: Policy,
            now: float) -> Observation:
    """Build the planner's state. Jobs without GPUs are not the planner's
    business and are left out; a job without a valid job tag is rigid at the
    GPUs it asked for, in the tier of its partition."""
    used: dict[str, int] = {}
    states: list[JobState] = []
    views: dict[int, JobView] = {}
    for job in jobs:
        running = job.state in RUNNING_STATES
        pending = job.state in PENDING_STATES
        if not (running or pending):
            continue
        requested = requested_gpus(job)
        placement = placement_of(job) if running else ()
        held = sum(g for _, g in placement) if placement else (requested if running else 0)
        for name, g in placement:
            used[name] = used.get(name, 0) + g
        view = _view(job, policy, held if running else requested, requested)
        if view is None:
            continue
        views[job.job_id] = view
        states.append(_job_state(view, running, held, placement, now, policy))
    return Observation(ClusterState(now, node_states(nodes, used), tuple(states)), views)


def _view(job: Job, policy: Policy, devices: int, requested: int) -> JobView | None:
    if requested <= 0 and devices <= 0:
        return None
    marks = read_marks(str(job.extra.get("admin_comment") or ""))
    try:
        tag = contract.parse_job_tag(marks.tag)
    except contract.ContractError as exc:
        log.warning("[job %s] ignoring its job tag: %s", job.job_id, exc)
        tag = None
    tier = None
    world = requested
    elastic = None
    if tag is not None:
        try:
            tier = Tier(str(tag["sla"]))
        except ValueError:
            tier = None
        world = int(tag["ws"])  # type: ignore[arg-type]
        elastic = tag["elastic"]  # type: ignore[assignment]
    if tier is None:
        tier = policy.tier_of_partition(job.partition) or policy.defaults.tier
    return JobView(job, marks, tier, max(world, 1), devices, requested, elastic)


def _job_state(view: JobView, running: bool, held: int,
               placement: tuple[tuple[str, int], ...], now: float, policy: Policy) -> JobState:
    job = view.job
    lo, hi = view.elastic or (view.requested, view.requested)
    world = view.world_size
    lo, hi = min(lo, world), min(hi, world)
    if running:
        phase = JobPhase.RESIZING if view.marks.resize_to is not None else JobPhase.RUNNING
    else:
        phase = JobPhase.PENDING
    start = float(job.extra.get("start_time") or now) if running else now
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
        submit_time=float(job.extra.get("submit_time") or now), devices=devices,
        placement=placement if devices and sum(g for _, g in placement) == devices else (),
        work_done_s=work, work_as_of=now)
