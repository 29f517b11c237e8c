"""Builders for small cluster shapes used by the planner's tests."""

from __future__ import annotations

from slurm_singularity.policy.api import Tier
from slurm_singularity.sched.api import ClusterState, JobPhase, JobState, NodeState


def job(job_id: int, tier: str = "basic", account: str = "a", world: int = 8,
        elastic: tuple[int, int] | None = None, devices: int = 0, submit: float = 0.0,
        work_done_s: float | None = None) -> JobState:
    """A job; ``devices > 0`` makes it running (placed later by ``cluster``)."""
    lo, hi = elastic or (world, world)
    phase = JobPhase.RUNNING if devices else JobPhase.PENDING
    return JobState(job_id=job_id, tier=Tier(tier), account=account, world_size=world,
                    min_devices=lo, max_devices=hi, phase=phase, submit_time=submit,
                    devices=devices, work_done_s=0.0 if work_done_s is None else work_done_s)


def place_first_fit(free: list[int], size: int) -> tuple[tuple[str, int], ...] | None:
    """Take ``size`` GPUs from nodes ``n1..`` first-fit (updating ``free``); None if they do not fit."""
    if sum(free) < size:
        return None
    left, pl = size, []
    for k in range(len(free)):
        give = min(free[k], left)
        if give:
            free[k] -= give
            left -= give
            pl.append((f"n{k + 1}", give))
    return tuple(pl)


def cluster(jobs: list[JobState], nodes: int = 4, gpus_per_node: int = 8,
            now: float = 100.0) -> ClusterState:
    """Place running jobs first-fit across nodes (spanning nodes) and build the state."""
    free = [gpus_per_node] * nodes
    placed = []
    for j in jobs:
        if j.devices and not j.placement:
            pl = place_first_fit(free, j.devices)
            if pl is None:
                raise ValueError(f"job {j.job_id} does not fit")
            j = JobState(**{**{f: getattr(j, f) for f in j.__slots__}, "placement": pl})
        placed.append(j)
    node_states = tuple(NodeState(f"n{k + 1}", gpus_per_node, free[k]) for k in range(nodes))
    return ClusterState(now, node_states, tuple(placed))
