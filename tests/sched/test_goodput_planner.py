"""The goodput-aware planner: GPUs go where the default speed-up curve says
they buy the most progress (``sched/goodput.py``, ``PlannerSettings.goodput_start``)."""

from __future__ import annotations

from slurm_singularity.sched import goodput
from slurm_singularity.sched.api import ActionKind, PlannerSettings
from slurm_singularity.sched.planner import plan
from slurm_singularity.sched.sim.policies import reference_policy

from sched_shapes import cluster, job

POLICY = reference_policy()


def starts(actions):
    return [(a.kind, a.job_id, a.devices_to) for a in actions]


def test_a_16_gpu_job_that_cannot_start_at_max_starts_on_one_node_where_its_gpus_buy_most():
    # 24 of 32 GPUs busy with a rigid basic job: 8 free, one node's worth
    state = cluster([job(1, "basic", world=24, devices=24),
                     job(2, "basic", world=16, elastic=(2, 16), submit=50.0)])
    assert goodput.efficient_size((2, 4, 8, 16), 16, 0.5) == 8
    assert starts(plan(state, POLICY)) == [(ActionKind.START, 2, 8)]


def test_without_goodput_start_the_same_job_waits_for_its_max():
    state = cluster([job(1, "basic", world=24, devices=24),
                     job(2, "basic", world=16, elastic=(2, 16), submit=50.0)])
    assert starts(plan(state, POLICY, settings=PlannerSettings(goodput_start=0.0))) == []


def test_a_job_whose_every_gpu_buys_about_as_much_still_waits_for_its_max():
    # an 8-GPU job's all-reduce stays inside its node: halving it buys little
    state = cluster([job(1, "basic", world=28, elastic=(28, 28), devices=28),
                     job(2, "basic", world=8, elastic=(1, 8), submit=50.0)])
    assert goodput.efficient_size((1, 2, 4, 8), 8, 0.5) == 8
    assert starts(plan(state, POLICY)) == []


def test_on_free_gpus_enough_for_max_the_job_starts_at_max():
    state = cluster([job(2, "basic", world=16, elastic=(2, 16), submit=50.0)])
    assert starts(plan(state, POLICY)) == [(ActionKind.START, 2, 16)]


def test_a_grow_that_gains_less_over_the_hysteresis_window_than_it_costs_is_not_made():
    state = cluster([job(1, "basic", world=16, elastic=(2, 16), devices=8, work_done_s=3600.0)])
    assert starts(plan(state, POLICY)) == [(ActionKind.GROW, 1, 16)]
    costly = PlannerSettings(grow_cost_s=1e4, min_run_s=600.0)
    assert starts(plan(state, POLICY, settings=costly)) == []
