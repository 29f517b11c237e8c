"""Contract of the scheduler: the values the planner reads and the actions it
returns.

The planner (``planner.plan``) is a pure function ``(ClusterState, Policy) ->
tuple[Action, ...]``. The scheduler-hook daemon builds a ``ClusterState`` from
Slurm and the checkpoints and executes the actions; the simulator builds it
from a trace and applies the actions to its model. Both therefore take the
same decisions from the same state, and this module is all they share.

A job's progress is stated in *work seconds*: seconds of running at its full
world size (``D == W``) without overhead. The GPU fraction that the tiers
promise is ``work done / time since submission``; the state carries the work
done as a linear function of time (``work_done_s`` as of ``work_as_of`` plus
``work_rate`` per second since then), so that a caller can keep a job's state
object unchanged until its size changes (the simulator does) or restate it on
every pass (the daemon can, with ``work_rate=0``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from operator import attrgetter

from ..policy.api import Tier


class SchedError(ValueError):
    """Root of the scheduler's errors (the simulator's ``TraceError`` and
    ``SimError`` too): a scheduler value is invalid; the message names the
    field."""


class JobPhase(enum.Enum):
    """Where a job is in its life, as the planner sees it.

    Legal transitions::

        HELD      -> PENDING (released, or its begin time came) | CANCELLED
        PENDING   -> RUNNING (start) | HELD | CANCELLED
        RUNNING   -> RESIZING (grow/shrink) | PREEMPTING (preempt)
                     | COMPLETED | FAILED | CANCELLED
        RESIZING  -> RUNNING (at the new size) | FAILED | CANCELLED
        PREEMPTING-> PENDING (checkpointed and requeued) | FAILED | CANCELLED

    Terminal: COMPLETED, FAILED, CANCELLED. The planner acts only on PENDING
    and RUNNING jobs; a HELD job (held by its user or an admin, or waiting
    for a begin time of its own) is no demand: nothing is shrunk for it; RESIZING and PREEMPTING jobs keep the devices they hold
    until their transition ends, and terminal jobs are ignored.
    """

    HELD = "held"
    PENDING = "pending"
    RUNNING = "running"
    RESIZING = "resizing"
    PREEMPTING = "preempting"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobPhase.COMPLETED, JobPhase.FAILED, JobPhase.CANCELLED)



@dataclass(frozen=True, slots=True)
class NodeState:
    """A node and how many of its GPUs no job holds."""

    name: str
    gpus: int
    free_gpus: int

    def __post_init__(self) -> None:
        if self.gpus < 0:
            raise SchedError(f"node {self.name}: gpus must be >= 0, got {self.gpus}")
        if not 0 <= self.free_gpus <= self.gpus:
            raise SchedError(
                f"node {self.name}: free_gpus must be between 0 and gpus={self.gpus}, "
                f"got {self.free_gpus}")


@dataclass(frozen=True, slots=True)
class JobState:
    """One job as the planner sees it.

    ``devices`` is the number of GPUs held now (0 while pending);
    ``placement`` says on which nodes, as ``(node, gpus)`` pairs summing to
    ``devices``. ``min_devices:max_devices`` is the elastic range (equal for a
    rigid job); every size the planner gives divides ``world_size``.
    """

    job_id: int
    tier: Tier
    account: str
    world_size: int
    min_devices: int
    max_devices: int
    phase: JobPhase
    #: Submission time, seconds on the same clock as ``ClusterState.now``.
    submit_time: float
    devices: int = 0
    placement: tuple[tuple[str, int], ...] = ()
    #: Work seconds done as of ``work_as_of`` (see the module docstring).
    work_done_s: float = 0.0
    #: Time at which ``work_done_s`` was measured; None = ``ClusterState.now``.
    work_as_of: float | None = None
    #: Work seconds gained per second since ``work_as_of`` (about D/W while running).
    work_rate: float = 0.0
    #: When the job last started or changed size (same clock as ``now``); None
    #: = unknown, and then no hysteresis protects it (``PlannerSettings.min_run_s``).
    sized_at: float | None = None
    #: The size a resize in flight goes to (0 = none; the daemon's, whose
    #: resizes are requeues): a RESIZING job that grows holds the GPUs it
    #: grows into, and a PENDING one (requeued, not run again) starts at this
    #: size only; fair-share corrections of its account wait until it runs.
    #: The simulator's resizes are instant and never set it.
    restart_size: int = 0

    def __post_init__(self) -> None:
        j = f"job {self.job_id}"
        if self.world_size < 1:
            raise SchedError(f"{j}: world_size must be >= 1, got {self.world_size}")
        if not 1 <= self.min_devices <= self.max_devices <= self.world_size:
            raise SchedError(
                f"{j}: elastic range must satisfy 1 <= min <= max <= world_size="
                f"{self.world_size}, got {self.min_devices}:{self.max_devices}")
        if self.devices < 0 or (self.devices and self.world_size % self.devices):
            raise SchedError(
                f"{j}: devices must divide world_size={self.world_size}, got {self.devices}")
        if self.phase in (JobPhase.PENDING, JobPhase.HELD) and self.devices:
            raise SchedError(f"{j}: a {self.phase.value} job holds no devices, "
                             f"got devices={self.devices}")
        if self.phase is JobPhase.RUNNING and not self.devices:
            raise SchedError(f"{j}: a running job holds devices, got devices=0")
        if self.placement and sum(n for _, n in self.placement) != self.devices:
            raise SchedError(f"{j}: placement {self.placement} does not sum to devices={self.devices}")
        if self.restart_size and (self.phase not in (JobPhase.PENDING, JobPhase.HELD,
                                                     JobPhase.RESIZING)
                                  or self.restart_size < 0
                                  or self.world_size % self.restart_size):
            raise SchedError(f"{j}: restart_size must divide world_size={self.world_size} and "
                             f"is for a pending or resizing job only, got {self.restart_size} "
                             f"({self.phase.value})")
        if self.work_done_s < 0 or self.work_rate < 0:
            raise SchedError(f"{j}: work_done_s and work_rate must be >= 0")

    def work_at(self, now: float) -> float:
        """Work seconds done at time ``now``."""
        as_of = now if self.work_as_of is None else self.work_as_of
        return self.work_done_s + self.work_rate * max(0.0, now - as_of)

    def gpu_fraction(self, now: float) -> float:
        """Ideal run time / actual run time so far (1.0 before any time has passed)."""
        elapsed = now - self.submit_time
        if elapsed <= 0:
            return 1.0
        return min(1.0, self.work_at(now) / elapsed)


@dataclass(frozen=True, slots=True)
class PlannerSettings:
    """How the planner trades churn against response: the knobs that are not
    policy (the policy says who may take from whom; these say how eagerly).

    The defaults are the ones ``bench/simulate.py`` measured best on Philly
    (docs/simulator.md, the ablations); each can be turned off for an
    ablation or a site that wants the old behaviour.
    """

    #: Hysteresis, seconds (default 600, range 0 to 1e6; 0 = off): a running
    #: job that started or changed size less than this long ago is not
    #: shrunk or preempted to make room, except for a demand of the policy's
    #: top tier (premium's promise outranks it), which takes such jobs last.
    #: Stops one job being preempted hundreds of times.
    min_run_s: float = 600.0
    #: Least attained service inside a tier (default True): demands of one
    #: account go in order of GPU-seconds already received (work done x W),
    #: fewest first, and a running job held below its promise competes in
    #: that order instead of before every pending job of its tier. False: by
    #: submission, below-promise jobs first (the rule issue 14 questioned).
    las_order: bool = True
    #: Fair share between accounts inside a tier (default True): accounts take
    #: turns, lowest usage per ``fair_share_weight`` first. False: one queue
    #: for the whole tier (an ablation; quotas still hold).
    fair_share: bool = True
    #: What one grow costs the job, seconds without progress (default 10.0,
    #: range 0 to 1e4): checkpoint 1.3 s + hand-over 2.3 s + decision to
    #: running 2.0 s + restore 4.1 s, the figures of ``sched/sim/constants.py``.
    grow_cost_s: float = 10.0
    #: Grow into idle GPUs only when it pays this many times over (default
    #: 0.0 = always grow, range 0 to 1e6): the time a grow saves, estimated
    #: from the work the job has done (a job that has run long is expected to
    #: run about as long again, the premise of least attained service), must
    #: be at least ``grow_payback x grow_cost_s``. Off by default: with
    #: ``start_at_max`` only shrunk jobs grow, and on Philly 4.0 changed
    #: nothing (``bench/simulate.py``, ablation ``singularity:cost-aware-growth``).
    grow_payback: float = 0.0
    #: Share of the cluster's GPUs that growth into idle GPUs leaves free
    #: (default 0.01, range 0 to 1; rounded down: 5 GPUs of 512, none of 32):
    #: an arriving job starts on them at once instead of waiting for a grown
    #: job's checkpoint and hand-over. On the first 15,000 Philly jobs (512
    #: GPUs) premium SLA per job 81.5% -> 89.4%, average JCT 6.66 h -> 6.71 h.
    grow_reserve: float = 0.01
    #: Least-attained-service preemption inside a tier that promises no GPU
    #: fraction (``gpu_fraction = 0``, basic by default) and may be preempted:
    #: a pending job preempts a running job of its own tier that has had at
    #: least this many times its attained GPU-seconds (default 0.0 = off,
    #: range 0 to 1e6), and at least ``las_preempt_min_gpu_s``, as Tiresias
    #: time-shares one queue. Hysteresis (``min_run_s``) still holds.
    las_preempt_factor: float = 0.0
    #: The least attained service a job must have before a job of its own
    #: tier may preempt it, GPU-seconds (default 3250, Tiresias' first queue
    #: limit; range 0 to 1e12).
    las_preempt_min_gpu_s: float = 3250.0
    #: Start at MAX (default True): a pending job starts only at the largest
    #: size of its ladder, never smaller. Elasticity is then for jobs that run:
    #: shrinking them for a higher tier instead of preempting them, and growing
    #: them back. With speed-up about linear in the GPUs, fewer jobs at full
    #: speed finish sooner on average than more at part speed (on the first
    #: 15,000 Philly jobs, 512 GPUs: average JCT 7.66 h -> 6.66 h).
    start_at_max: bool = True
    #: Elasticity (default True): False is the rigid planner (the ablation
    #: "MIN = W"): every job runs at its MAX only, so nothing grows or shrinks
    #: and making room preempts whole jobs.
    elastic: bool = True
    #: Goodput-aware start (default 0.5, range 0 to 1; 0 = off): a pending
    #: job that free GPUs cannot start at MAX may start at its *efficient
    #: size* (``sched/goodput.py``, ``efficient_size``): the size below which
    #: each GPU buys at least this share of what the GPUs below it buy on
    #: average (the planner's default speed-up curve: a 16-GPU job starts on
    #: one node of 8, where its all-reduce stays inside the node), and grows
    #: into idle GPUs later. Non-zero also keeps a job from growing when the
    #: work the grow gains over ``min_run_s`` is less than what it loses to
    #: ``grow_cost_s`` (both on the default curve).
    goodput_start: float = 0.5

    def __post_init__(self) -> None:
        for name, hi in (("min_run_s", 1e6), ("grow_cost_s", 1e4), ("grow_payback", 1e6),
                         ("las_preempt_factor", 1e6), ("las_preempt_min_gpu_s", 1e12),
                         ("grow_reserve", 1.0), ("goodput_start", 1.0)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= hi:
                raise SchedError(f"planner settings: {name} must be a number in [0, {hi:g}], "
                                 f"got {v!r}")
        for name in ("las_order", "fair_share", "start_at_max", "elastic"):
            if not isinstance(getattr(self, name), bool):
                raise SchedError(f"planner settings: {name} must be true or false, "
                                 f"got {getattr(self, name)!r}")


@dataclass(frozen=True, slots=True)
class ClusterState:
    """Everything the planner decides from: the time, the nodes and the jobs."""

    now: float
    nodes: tuple[NodeState, ...]
    jobs: tuple[JobState, ...]
    #: ``(GPUs, free GPUs)`` summed over ``nodes``, from a caller that keeps
    #: the sums as its nodes change (the simulator: summing 12,500 nodes on
    #: every pass was most of its time at 100,000 GPUs) and builds its node
    #: names itself; None = summed here, and the names checked.
    sums: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.sums is not None:
            gpus, free = self.sums
            if not 0 <= free <= gpus:
                raise SchedError(f"sums: free GPUs must be between 0 and GPUs={gpus}, "
                                 f"got {free}")
            return
        names = {n.name for n in self.nodes}
        if len(names) != len(self.nodes):
            raise SchedError("node names must be unique")
        object.__setattr__(self, "sums", (sum(n.gpus for n in self.nodes),
                                          sum(map(_FREE_GPUS, self.nodes))))

    @property
    def total_gpus(self) -> int:
        return self.sums[0]

    @property
    def free_gpus(self) -> int:
        return self.sums[1]


_FREE_GPUS = attrgetter("free_gpus")


class ActionKind(enum.Enum):
    """What the planner asks for one job."""

    START = "start"      # pending -> running at ``devices_to``
    GROW = "grow"        # running at devices_from -> devices_to (larger)
    SHRINK = "shrink"    # running at devices_from -> devices_to (smaller, >= MIN)
    PREEMPT = "preempt"  # checkpoint and requeue; devices_to == 0
    LEAVE = "leave"      # nothing to do now (only reported when asked, with why)


@dataclass(frozen=True, slots=True)
class Action:
    """One decision of the planner, with the reason taken from the policy.

    ``placement`` is the job's whole placement after the action as
    ``(node, gpus)`` pairs (empty for PREEMPT and LEAVE). ``for_job`` names
    the job that a SHRINK or PREEMPT makes room for, when there is one.
    """

    kind: ActionKind
    job_id: int
    devices_from: int
    devices_to: int
    reason: str
    placement: tuple[tuple[str, int], ...] = ()
    for_job: int | None = None

    def __post_init__(self) -> None:
        k = self.kind
        ok = {
            ActionKind.START: self.devices_from == 0 < self.devices_to,
            ActionKind.GROW: 0 < self.devices_from < self.devices_to,
            ActionKind.SHRINK: 0 < self.devices_to < self.devices_from,
            ActionKind.PREEMPT: self.devices_from > 0 and self.devices_to == 0,
            ActionKind.LEAVE: self.devices_from == self.devices_to,
        }[k]
        if not ok:
            raise SchedError(
                f"job {self.job_id}: {k.value} cannot go from {self.devices_from} "
                f"to {self.devices_to} devices")
        if not self.reason:
            raise SchedError(f"job {self.job_id}: an action needs a reason")
