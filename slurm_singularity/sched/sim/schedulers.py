"""The schedulers the simulator compares, and the names that choose them.

- ``singularity``: the project's planner, unchanged -- each pass builds a
  ``ClusterState`` and applies what ``sched.planner.plan`` returns. There is
  no second copy of its logic here, only the bookkeeping that turns actions
  into the engine's resizes and keeps each job's ``JobState`` current. It
  runs at the daemon's period and pays the daemon's measured costs.
  ``singularity:ABLATION`` is the same planner with one of its
  ``PlannerSettings`` turned off (``ABLATIONS``): what each is worth;
  ``singularity:linear`` (and ``:rigid-linear``) runs it under the linear
  job model (``Scaling.LINEAR``, ``LINEAR_ABLATIONS``): what the sub-linear
  curve is worth.
- ``slurm``, ``slurm-periodic:SECONDS``, ``slurm-no-ckpt`` (a bound): Slurm
  22.05 as the templates configure it (``slurm.py``).
- ``tiresias``, ``tiresias:K``, ``las-tiers``: least-attained-service
  baselines (``las.py``).
"""

from __future__ import annotations

import dataclasses
import math
from operator import attrgetter
from typing import Callable

from ...policy.api import Policy
from .. import planner as planner_module
from ..api import ActionKind, ClusterState, JobPhase, JobState, NodeState, PlannerSettings
from .constants import DAEMON_COSTS, Costs, Scaling
from .engine import Engine, Save, SimJob
from .las import TiresiasScheduler
from .slurm import SlurmScheduler

_VIEW = attrgetter("view")

#: ``singularity:NAME``: the planner with these settings changed (ablations).
ABLATIONS: dict[str, dict] = {
    "rigid": {"elastic": False},                 # MIN = W for every job
    "no-hysteresis": {"min_run_s": 0.0},
    "no-fair-share": {"fair_share": False},
    "no-las": {"las_order": False},              # submission order, below-promise first
    "cost-aware-growth": {"grow_payback": 4.0},  # grow only when 4x the grow cost is saved
    "start-small": {"start_at_max": False},      # start at the promised size (or MIN)
    "no-reserve": {"grow_reserve": 0.0},         # grow into every idle GPU
    "las-preempt": {"las_preempt_factor": 4.0},  # LAS preemption inside basic
    "rigid-las-preempt": {"elastic": False, "las_preempt_factor": 4.0},  # both
    "before": {"min_run_s": 0.0, "las_order": False, "start_at_max": False,  # issue 14's
               "grow_reserve": 0.0},
    "no-goodput": {"goodput_start": 0.0},        # start at MAX only, grow whenever idle
}

#: ``singularity:NAME`` under the linear job model (``Scaling.LINEAR``): the
#: settings of ``ABLATIONS[NAME]`` (``""``: the defaults).
LINEAR_ABLATIONS: dict[str, str] = {"linear": "", "rigid-linear": "rigid"}

#: The names ``--scheduler`` takes (SECONDS and K: positive numbers).
SCHEDULERS = ("singularity", "slurm", "slurm-periodic:SECONDS", "slurm-no-ckpt", "tiresias",
              "tiresias:K", "las-tiers", "singularity:ABLATION")

#: What bench/simulate.py runs side by side (slurm-no-ckpt as a bound).
COMPARED = ("singularity", "slurm", "slurm-no-ckpt", "tiresias", "las-tiers")


def check_scheduler(name: object) -> str:
    """``name`` if it names a scheduler; raises ``ValueError`` saying what is accepted."""
    if isinstance(name, str):
        base, _, arg = name.partition(":")
        if name in SCHEDULERS and ":" not in name:
            return name
        if base == "singularity" and (arg in ABLATIONS or arg in LINEAR_ABLATIONS):
            return name
        if base in ("slurm-periodic", "tiresias") and arg:
            try:
                value = float(arg)
            except ValueError:
                value = float("nan")
            if math.isfinite(value) and 0 < value <= 1e9:
                return name
            raise ValueError(f"--scheduler {name!r}: {arg!r} must be a number in (0, 1e9]")
    raise ValueError(f"--scheduler: unknown {name!r} (expected one of {', '.join(SCHEDULERS)}; "
                     f"ABLATION one of {', '.join(list(ABLATIONS) + list(LINEAR_ABLATIONS))})")


def make_scheduler(name: str, policy: Policy, total_gpus: int, gpus_per_node: int,
                   record: Callable | None = None, incremental: bool = True):
    """The scheduler ``name`` (checked by ``check_scheduler``) for this cluster;
    ``incremental=False``: the planner's plain path (``SingularityScheduler``)."""
    base, _, arg = name.partition(":")
    if base == "singularity":
        costs = DAEMON_COSTS
        if arg in LINEAR_ABLATIONS:
            costs = dataclasses.replace(DAEMON_COSTS, scaling=Scaling.LINEAR)
            arg = LINEAR_ABLATIONS[arg]
        settings = PlannerSettings(**ABLATIONS[arg]) if arg else PlannerSettings()
        sched = SingularityScheduler(policy, total_gpus, gpus_per_node, record,
                                     costs=costs, settings=settings, incremental=incremental)
        sched.name = name
        return sched
    if base == "slurm":
        return SlurmScheduler(policy, total_gpus)
    if base == "slurm-no-ckpt":
        return SlurmScheduler(policy, total_gpus, grace_checkpoint=False)
    if base == "slurm-periodic":
        return SlurmScheduler(policy, total_gpus, periodic_s=float(arg))
    if base == "tiresias":
        return TiresiasScheduler(total_gpus, promote_knob=float(arg or 0))
    if base == "las-tiers":
        return TiresiasScheduler(total_gpus, policy=policy)
    raise ValueError(f"--scheduler: unknown {name!r}")


class SingularityScheduler:
    """Drives ``sched.planner.plan`` -- the function the daemon calls."""

    name = "singularity"

    def __init__(self, policy: Policy, total_gpus: int, gpus_per_node: int,
                 record: Callable[[ClusterState, tuple], None] | None = None,
                 costs: Costs = DAEMON_COSTS, settings: PlannerSettings | None = None,
                 incremental: bool = True) -> None:
        self.policy = policy
        #: False: the plain path (the planner's plain search, every pass
        #: built from scratch), to check that the fast one decides the same.
        self.incremental = incremental
        self.settings = settings or PlannerSettings()
        self.costs = costs
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
        self.total = total_gpus
        self.free_total = total_gpus      # kept as placements move (ClusterState.sums)
        self.node_tuple: tuple[NodeState, ...] | None = None
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
                        job.work, max(now, job.stall_until), job.rate if running else 0.0,
                        job.step_start if running else None)

    def on_arrival(self, job: SimJob, now: float) -> None:
        job.view = self._view(job, now)
        self.dirty = True

    def on_finish(self, job: SimJob, now: float) -> None:
        self._move(job.placement, +1)
        job.placement = ()
        self.dirty = True

    def _move(self, placement: tuple[tuple[str, int], ...], sign: int) -> None:
        if placement:
            self.node_tuple = None
        for name, n in placement:
            self.free[name] += sign * n
            self.free_total += sign * n
            k = self.node_index[name]
            self.nodes[k] = NodeState(name, self.nodes[k].gpus, self.free[name])

    def schedule(self, now: float) -> None:
        if not self.dirty:
            return None
        self.dirty = False
        engine = self.engine
        if self.node_tuple is None:
            self.node_tuple = tuple(self.nodes)
        state = ClusterState(now, self.node_tuple, tuple(map(_VIEW, engine.active.values())),
                             (self.total, self.free_total))
        actions = planner_module.plan(state, self.policy, settings=self.settings,
                                      reuse=self.incremental)
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
            engine.resize(job, now, a.devices_to, Save.CHECKPOINT)
            job.view = self._view(job, now)
        return None
