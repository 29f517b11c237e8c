"""Apply a plan to a state as if every action took effect at once.

Used by tests, by ``job explain``-style dry runs and by the simulator's
consistency check: ``plan`` then ``apply_actions`` gives the state the
daemon is steering towards. Transitions (checkpoint time, restarts) are the
executor's business, not modelled here.
"""

from __future__ import annotations

from dataclasses import replace

from .api import Action, ActionKind, ClusterState, JobPhase, NodeState, SchedError


def apply_actions(state: ClusterState, actions: tuple[Action, ...]) -> ClusterState:
    """The state after ``actions``: jobs resized, started or requeued, nodes' free counts updated.

    :raises SchedError: an action names an unknown job or would over-allocate a node.
    """
    jobs = {j.job_id: j for j in state.jobs}
    free = {n.name: n.free_gpus for n in state.nodes}
    for a in actions:
        if a.kind is ActionKind.LEAVE:
            continue
        job = jobs.get(a.job_id)
        if job is None:
            raise SchedError(f"action for unknown job {a.job_id}")
        for name, n in job.placement:
            if name in free:
                free[name] += n
        for name, n in a.placement:
            if name in free:
                free[name] -= n
                if free[name] < 0:
                    raise SchedError(f"node {name}: over-allocated by action for job {a.job_id}")
        phase = JobPhase.PENDING if a.kind is ActionKind.PREEMPT else JobPhase.RUNNING
        jobs[a.job_id] = replace(job, devices=a.devices_to, placement=a.placement, phase=phase)
    nodes = tuple(NodeState(n.name, n.gpus, free[n.name]) for n in state.nodes)
    return ClusterState(state.now, nodes, tuple(jobs.values()))
