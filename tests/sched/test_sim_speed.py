"""The simulator's fast path decides exactly what the plain path decides.

The planner reuses, within a pass and while no size has changed, what one
demand's search for GPUs found for the next demand of its account
(``plan(reuse=True)``, the default; ``SimSpec.incremental``). These tests
compare it with the plain search (``reuse=False``) on random clusters and on
a contended slice of the Philly trace: same actions and reasons, same
per-job end times, same summary.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_singularity.policy.api import Tier
from slurm_singularity.sched.api import ClusterState, JobPhase, JobState, NodeState, PlannerSettings
from slurm_singularity.sched.planner import plan
from slurm_singularity.sched.sim.policies import reference_policy
from slurm_singularity.sched.sim.run import SimError, SimSpec, simulate
from slurm_singularity.sched.sim.schedulers import ABLATIONS

from sched_shapes import place_first_fit

PHILLY = Path("/work/shared/traces/philly.csv")

#: A few shapes only, so that many demands share an account and a shape
#: (what the reuse is for).
SHAPES = ((1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8), (8, 2, 8), (8, 4, 8), (4, 1, 4), (16, 8, 16))


@st.composite
def crowded(draw):
    """A small cluster with more demand than GPUs: many pending jobs of few
    accounts and shapes, running jobs of every tier, some under hysteresis."""
    nodes = draw(st.integers(1, 4))
    free = [8] * nodes
    jobs = []
    for k in range(draw(st.integers(4, 40))):
        w, lo, hi = draw(st.sampled_from(SHAPES))
        size = draw(st.sampled_from((0, 0, lo, hi)))
        placement = place_first_fit(free, size) if size else ()
        if placement is None:
            size, placement = 0, ()
        jobs.append(JobState(k + 1, draw(st.sampled_from(list(Tier))),
                             draw(st.sampled_from(("a", "b", "c"))), w, lo, hi,
                             JobPhase.RUNNING if size else JobPhase.PENDING,
                             draw(st.floats(0, 99)), size, tuple(placement),
                             draw(st.floats(0, 500)), None,
                             draw(st.sampled_from((0.0, 0.5, 1.0))) if size else 0.0,
                             draw(st.sampled_from((None, 0.0, 950.0))) if size else None))
    state = ClusterState(1000.0, tuple(NodeState(f"n{i + 1}", 8, free[i]) for i in range(nodes)),
                         tuple(jobs))
    policy = reference_policy(weights={"a": draw(st.floats(0.5, 4)), "b": 1.0},
                              quotas=draw(st.sampled_from(({}, {"c": 4}))),
                              standard_preemptible=draw(st.booleans()))
    ablation = draw(st.sampled_from(("",) + tuple(ABLATIONS)))
    return state, policy, PlannerSettings(**ABLATIONS[ablation]) if ablation else PlannerSettings()


@settings(max_examples=400, deadline=None)
@given(crowded())
def test_the_planner_decides_and_explains_the_same_with_and_without_reuse(shape):
    state, policy, knobs = shape
    fast = plan(state, policy, explain_waiting=True, settings=knobs)
    plain = plan(state, policy, explain_waiting=True, settings=knobs, reuse=False)
    assert fast == plain


def slice_of_philly(tmp: Path, jobs: int) -> Path:
    with open(PHILLY, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = sorted((r for r in reader if r), key=lambda r: r[0])[:jobs]
    out = tmp / "slice.csv"
    with open(out, "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    return out


@pytest.mark.parametrize("scheduler", ["singularity", "singularity:las-preempt"])
def test_a_contended_philly_slice_ends_every_job_at_the_same_time_on_both_paths(
        tmp_path, scheduler):
    if not PHILLY.exists():
        pytest.skip(f"{PHILLY} is not on this machine")
    trace = slice_of_philly(tmp_path, 1500)
    runs = {}
    for incremental in (True, False):
        spec = SimSpec(trace, scheduler, 48, reference_policy(), tier_rule="random:20/30/50",
                       incremental=incremental)
        engine, summary = simulate(spec)
        ends = {j.job_id: (j.end, j.preemptions, j.resizes) for j in engine.done}
        summary.pop("wall_s")
        runs[incremental] = (ends, summary)
    (fast_ends, fast), (plain_ends, plain) = runs[True], runs[False]
    assert fast["preemptions"] + fast["resizes"] > 0, "the slice must be contended"
    assert fast_ends == plain_ends
    for key in ("avg_jct_s", "sla_attainment", "preemptions", "resizes", "lost_gpu_hours"):
        assert fast[key] == plain[key], key
    assert fast == plain


def test_a_spec_with_a_non_boolean_incremental_is_refused_naming_the_field(tmp_path):
    with pytest.raises(SimError, match="incremental: must be true or false, got 'no'"):
        SimSpec(tmp_path / "t.csv", "singularity", 8, reference_policy(), incremental="no")
