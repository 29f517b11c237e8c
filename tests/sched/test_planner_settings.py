"""The planner's settings (``PlannerSettings``) on small hand-made cluster
shapes: hysteresis, least attained service inside a tier, starting at MAX,
growth that must pay, the rigid ablation; and the pass stays fast."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_singularity.sched.api import ActionKind, PlannerSettings, SchedError
from slurm_singularity.sched.planner import plan
from slurm_singularity.sched.sim.policies import reference_policy

from sched_shapes import cluster, job

POLICY = reference_policy()
NOW = 10_000.0
ROOT = Path(__file__).resolve().parents[2]


def sized(j, at):
    return dataclasses.replace(j, sized_at=at)


def kinds(actions):
    return [(a.kind, a.job_id, a.devices_to) for a in actions]


def two_basic_jobs_and(demand):
    """Two rigid basic jobs of 16 on 32 GPUs: job 1 has run an hour, job 2
    (the newer, which victim order takes first) started a minute ago."""
    return cluster([sized(job(1, "basic", world=16, devices=16, submit=0.0), NOW - 3600),
                    sized(job(2, "basic", world=16, devices=16, submit=50.0), NOW - 60),
                    demand], now=NOW)


def test_hysteresis_spares_a_job_that_started_a_minute_ago_and_takes_the_older_one():
    state = two_basic_jobs_and(job(3, "standard", world=16, submit=NOW - 1))
    assert kinds(plan(state, POLICY)) == [(ActionKind.PREEMPT, 1, 0), (ActionKind.START, 3, 16)]
    # without hysteresis the newest job goes first, though it just started
    off = plan(state, POLICY, settings=PlannerSettings(min_run_s=0))
    assert kinds(off) == [(ActionKind.PREEMPT, 2, 0), (ActionKind.START, 3, 16)]


def test_hysteresis_makes_a_standard_job_wait_but_not_a_premium_one():
    young = sized(job(1, "basic", world=32, devices=32, submit=0.0), NOW - 60)
    standard = cluster([young, job(2, "standard", world=16, submit=NOW - 1)], now=NOW)
    assert plan(standard, POLICY) == ()
    why = plan(standard, POLICY, explain_waiting=True)[0].reason
    assert "needs 16 GPUs" in why and "started or resized in the last 600 s are spared" in why
    premium = cluster([young, job(2, "premium", world=16, submit=NOW - 1)], now=NOW)
    assert kinds(plan(premium, POLICY)) == [(ActionKind.PREEMPT, 1, 0), (ActionKind.START, 2, 16)]
    # ten minutes later the standard job gets it
    later = cluster([sized(young, NOW - 601), job(2, "standard", world=16, submit=NOW - 1)],
                    now=NOW)
    assert kinds(plan(later, POLICY)) == [(ActionKind.PREEMPT, 1, 0), (ActionKind.START, 2, 16)]


def test_least_attained_service_starts_the_job_that_has_had_less_gpu_time_first():
    # job 1 came first but already ran 1,000 s on 32 GPUs before it was preempted
    state = cluster([job(1, "basic", world=32, submit=0.0, work_done_s=1000.0),
                     job(2, "basic", world=32, submit=50.0)], now=NOW)
    assert kinds(plan(state, POLICY)) == [(ActionKind.START, 2, 32)]
    fifo = plan(state, POLICY, settings=PlannerSettings(las_order=False))
    assert kinds(fifo) == [(ActionKind.START, 1, 32)]


def test_a_job_below_its_promise_no_longer_outranks_every_pending_job_of_its_tier():
    # standard promises 70%: job 1 (2,000 s of work in 10,000 s) is below it,
    # held at 16 of 32; job 2 just arrived; 16 GPUs are free
    below = job(1, "standard", world=32, elastic=(16, 32), devices=16, submit=0.0,
                work_done_s=2000.0)
    state = cluster([below, job(2, "standard", world=16, submit=NOW - 10)], now=NOW)
    assert kinds(plan(state, POLICY)) == [(ActionKind.START, 2, 16)]
    old_rule = plan(state, POLICY, settings=PlannerSettings(las_order=False))
    assert kinds(old_rule) == [(ActionKind.GROW, 1, 32)]


def test_a_pending_job_starts_at_its_max_or_waits():
    premium = job(1, "premium", world=8, devices=8)
    state = cluster([premium, job(2, "basic", world=32, elastic=(8, 32), submit=50.0)], now=NOW)
    assert plan(state, POLICY) == ()
    small = plan(state, POLICY, settings=PlannerSettings(start_at_max=False))
    assert [(a.kind, a.job_id) for a in small] == [(ActionKind.START, 2)]
    assert small[0].devices_to < 32
    alone = cluster([job(2, "basic", world=32, elastic=(8, 32))], now=NOW)
    assert kinds(plan(alone, POLICY)) == [(ActionKind.START, 2, 32)]


def test_a_job_whose_max_exceeds_the_cluster_starts_at_the_largest_size_that_fits():
    state = cluster([job(1, "basic", world=64, elastic=(8, 64))], now=NOW)
    assert kinds(plan(state, POLICY)) == [(ActionKind.START, 1, 32)]


@pytest.mark.parametrize("work_s, grows", [(5.0, False), (3600.0, True)])
def test_growth_is_refused_when_it_does_not_pay_for_its_cost(work_s, grows):
    # held at 8 of 32 with 24 GPUs idle; one grow costs 10 s, it must save 4x that
    state = cluster([job(1, "basic", world=32, elastic=(8, 32), devices=8, work_done_s=work_s)],
                    now=NOW)
    costly = PlannerSettings(grow_payback=4.0, grow_cost_s=10.0)
    expected = [(ActionKind.GROW, 1, 32)] if grows else []
    assert kinds(plan(state, POLICY, settings=costly)) == expected
    # with the default (always grow) it grows either way
    assert kinds(plan(state, POLICY)) == [(ActionKind.GROW, 1, 32)]


def test_the_rigid_planner_preempts_instead_of_shrinking():
    state = cluster([job(1, "basic", world=32, elastic=(8, 32), devices=32),
                     job(2, "premium", world=16, submit=99.0)])
    assert kinds(plan(state, POLICY)) == [(ActionKind.SHRINK, 1, 16), (ActionKind.START, 2, 16)]
    rigid = plan(state, POLICY, settings=PlannerSettings(elastic=False))
    assert kinds(rigid) == [(ActionKind.PREEMPT, 1, 0), (ActionKind.START, 2, 16)]


@pytest.mark.parametrize("field, value, message", [
    ("min_run_s", -1, "min_run_s must be a number in [0, 1e+06], got -1"),
    ("grow_payback", float("nan"), "grow_payback must be a number in [0, 1e+06], got nan"),
    ("grow_cost_s", "10", "grow_cost_s must be a number in [0, 10000], got '10'"),
    ("las_order", 1, "las_order must be true or false, got 1"),
])
def test_a_bad_setting_is_refused_naming_the_field(field, value, message):
    with pytest.raises(SchedError) as err:
        PlannerSettings(**{field: value})
    assert message in str(err.value)


def test_one_planner_pass_over_100000_gpus_and_50000_jobs_takes_at_most_a_second():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "planner.py")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"planner pass: {result['value']} s")
    assert result["jobs"] == 50_000 and result["gpus"] == 100_000
    assert result["value"] <= 1.0, result


def test_growth_leaves_the_reserve_idle_for_arrivals():
    state = cluster([job(1, "basic", world=32, elastic=(8, 32), devices=8, work_done_s=3600.0)],
                    now=NOW)
    # a quarter of 32 GPUs stays idle: 16 of the 24 free may go to growth
    assert kinds(plan(state, POLICY, settings=PlannerSettings(grow_reserve=0.25))) == [
        (ActionKind.GROW, 1, 16)]


@pytest.mark.parametrize("work_s, preempts", [(3600.0, True), (50.0, False)])
def test_las_preemption_inside_basic_takes_a_job_that_has_had_far_more_gpu_time(work_s,
                                                                              preempts):
    # job 1 has had work_s x 32 GPU-seconds; job 2 of the same tier none
    state = cluster([sized(job(1, "basic", world=32, devices=32, work_done_s=work_s), 0.0),
                     job(2, "basic", world=16, submit=NOW - 1)], now=NOW)
    las = plan(state, POLICY, settings=PlannerSettings(las_preempt_factor=4.0))
    expected = [(ActionKind.PREEMPT, 1, 0), (ActionKind.START, 2, 16)] if preempts else []
    assert kinds(las) == expected
    if preempts:
        assert "least attained service first" in las[0].reason
    assert plan(state, POLICY) == ()          # off by default
