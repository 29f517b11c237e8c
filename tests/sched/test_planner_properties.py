"""Invariants of the planner on random small clusters (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_singularity.policy.api import Tier
from slurm_singularity.sched.api import ActionKind, ClusterState, JobPhase, JobState, NodeState
from slurm_singularity.sched.apply import apply_actions
from slurm_singularity.sched.planner import legal_sizes, plan, promised_size
from slurm_singularity.sched.sim.policies import reference_policy

from sched_shapes import place_first_fit

WORLDS = (1, 2, 4, 6, 8, 12, 16)


@st.composite
def shapes(draw):
    nodes = draw(st.integers(1, 4))
    gpn = draw(st.sampled_from((1, 2, 4, 8)))
    free = [gpn] * nodes
    jobs = []
    for k in range(draw(st.integers(0, 12))):
        w = draw(st.sampled_from(WORLDS))
        divs = [d for d in range(1, w + 1) if w % d == 0]
        lo = draw(st.sampled_from(divs))
        hi = draw(st.sampled_from([d for d in divs if d >= lo]))
        tier = draw(st.sampled_from(list(Tier)))
        account = draw(st.sampled_from(("a", "b", "c")))
        submit = draw(st.floats(0, 99))
        size = draw(st.sampled_from([0] + [d for d in divs if lo <= d <= hi]))
        placement = place_first_fit(free, size) if size else ()
        if placement is None:
            size, placement = 0, ()
        jobs.append(JobState(k + 1, tier, account, w, lo, hi,
                             JobPhase.RUNNING if size else JobPhase.PENDING, submit, size,
                             tuple(placement), draw(st.floats(0, 100))))
    state = ClusterState(100.0, tuple(NodeState(f"n{i + 1}", gpn, free[i]) for i in range(nodes)),
                         tuple(jobs))
    policy = reference_policy(
        weights={"a": draw(st.floats(0.5, 4)), "b": draw(st.floats(0.5, 4))},
        quotas=draw(st.sampled_from(({}, {"c": 4}))),
        standard_preemptible=draw(st.booleans()))
    return state, policy


@settings(max_examples=300, deadline=None)
@given(shapes())
def test_the_planner_never_breaks_its_invariants(shape):
    state, policy = shape
    actions = plan(state, policy)
    assert actions == plan(state, policy), "same input, same actions"
    after = apply_actions(state, actions)        # raises if a node is over-allocated
    assert all(n.free_gpus >= 0 for n in after.nodes)
    assert sum(j.devices for j in after.jobs) <= state.total_gpus
    before = {j.job_id: j for j in state.jobs}
    splice = policy.elastic.max_splice_factor
    for a in actions:
        job = before[a.job_id]
        assert a.devices_from == job.devices
        assert sum(n for _, n in a.placement) == a.devices_to
        if a.devices_to:
            assert a.devices_to in legal_sizes(job.world_size, job.min_devices,
                                               job.max_devices, splice)
            assert job.world_size % a.devices_to == 0
        if a.kind in (ActionKind.SHRINK, ActionKind.PREEMPT):
            by = before[a.for_job].tier
            spec = policy.tiers[job.tier]
            if by is job.tier:   # same tier: only loans above the promised size come back
                lad = legal_sizes(job.world_size, job.min_devices, job.max_devices, splice)
                assert a.kind is ActionKind.SHRINK
                assert a.devices_to >= promised_size(lad, job.world_size, spec.gpu_fraction)
            else:
                assert by in spec.preemptible_by, (a, by)
            assert by.rank >= job.tier.rank
            assert any(b.job_id == a.for_job and b.kind in (ActionKind.START, ActionKind.GROW)
                       for b in actions), "nothing is taken from a job for no one"
    quota = {"c": 4} if "c" in policy.accounts and policy.accounts["c"].gpu_quota else {}
    for acct, q in quota.items():
        held = sum(j.devices for j in after.jobs if j.account == acct)
        was = sum(j.devices for j in state.jobs if j.account == acct)
        assert held <= max(q, was)
