"""The planner on small cluster shapes (4 nodes x 8 GPUs unless said)."""

from __future__ import annotations

import pytest

from slurm_singularity.sched.api import ActionKind, PlannerSettings, SchedError
from slurm_singularity.sched.apply import apply_actions
from slurm_singularity.sched.planner import plan
from slurm_singularity.sched.sim.policies import reference_policy

from sched_shapes import cluster, job

POLICY = reference_policy()


def sizes(state):
    return {j.job_id: j.devices for j in state.jobs}


def test_an_elastic_basic_job_grows_to_its_max_on_an_idle_cluster():
    state = cluster([job(1, "basic", world=32, elastic=(8, 32))])
    actions = plan(state, POLICY)
    assert [(a.kind, a.job_id, a.devices_to) for a in actions] == [(ActionKind.START, 1, 32)]
    assert sum(n for _, n in actions[0].placement) == 32


def test_a_premium_job_arriving_shrinks_the_basic_job_instead_of_preempting_it():
    state = cluster([job(1, "basic", world=32, elastic=(8, 32), devices=32),
                     job(2, "premium", world=16, submit=99.0)])
    actions = plan(state, POLICY)
    got = [(a.kind, a.job_id, a.devices_to) for a in actions]
    assert got == [(ActionKind.SHRINK, 1, 16), (ActionKind.START, 2, 16)]
    assert actions[0].for_job == 2
    assert "preemptible_by includes premium" in actions[0].reason


def test_the_basic_job_grows_back_when_the_premium_job_leaves():
    # it has run an hour: growing back pays (PlannerSettings.grow_payback)
    state = cluster([job(1, "basic", world=32, elastic=(8, 32), devices=32, work_done_s=3600.0),
                     job(2, "premium", world=16, submit=99.0)])
    after = apply_actions(state, plan(state, POLICY))
    gone = cluster([j for j in after.jobs if j.job_id == 1])
    gone = type(gone)(gone.now, tuple(type(n)(n.name, n.gpus, n.gpus - sum(
        c for j in gone.jobs for name, c in j.placement if name == n.name)) for n in gone.nodes),
        gone.jobs)
    actions = plan(gone, POLICY)
    assert [(a.kind, a.job_id, a.devices_from, a.devices_to) for a in actions] == [
        (ActionKind.GROW, 1, 16, 32)]


def test_two_accounts_with_weights_two_to_one_get_gpu_shares_near_two_to_one():
    policy = reference_policy(weights={"heavy": 2.0, "light": 1.0})
    # jobs start at their MAX (PlannerSettings.start_at_max): 8 of 16 fit
    jobs = [job(k, "basic", "heavy" if k % 2 else "light", world=4, elastic=(1, 4), submit=k)
            for k in range(1, 17)]
    after = apply_actions(state := cluster(jobs), plan(state, policy))
    held = {"heavy": 0, "light": 0}
    for j in after.jobs:
        held[j.account] += j.devices
    assert held["heavy"] + held["light"] == 32
    assert 1.6 <= held["heavy"] / held["light"] <= 2.5, held


def test_idle_gpus_lent_to_the_first_account_are_shared_by_weight_once_the_other_arrives():
    """The first account's jobs grew into the whole cluster before the second
    account's jobs arrived; those started at their MIN. Passes move the loans
    until the shares are near the 2:1 weights instead of leaving them 28:4."""
    policy = reference_policy(weights={"heavy": 2.0, "light": 1.0})
    running = [job(k, "basic", "heavy", world=8, elastic=(1, 8), devices=d, submit=k)
               for k, d in zip(range(1, 5), (8, 8, 8, 4))]
    running += [job(k, "basic", "light", world=8, elastic=(1, 8), devices=1, submit=k)
                for k in range(5, 9)]
    state = cluster(running)
    for _ in range(3):
        state = apply_actions(state, plan(state, policy))
    held = {"heavy": 0, "light": 0}
    for j in state.jobs:
        held[j.account] += j.devices
    assert held["heavy"] + held["light"] == 32
    assert 1.6 <= held["heavy"] / held["light"] <= 2.5, held
    assert plan(state, policy) == (), "a balanced cluster is left alone"


def test_loans_do_not_move_between_accounts_that_are_already_near_their_weights():
    policy = reference_policy(weights={"heavy": 2.0, "light": 1.0})
    state = cluster([job(1, "basic", "heavy", world=8, elastic=(1, 8), devices=8),
                     job(2, "basic", "heavy", world=8, elastic=(1, 8), devices=8, submit=1),
                     job(3, "basic", "heavy", world=8, elastic=(1, 8), devices=4, submit=2),
                     job(4, "basic", "light", world=8, elastic=(1, 8), devices=8, submit=3),
                     job(5, "basic", "light", world=8, elastic=(1, 8), devices=4, submit=4)])
    assert plan(state, policy) == ()


def test_a_premium_job_is_never_shrunk_for_a_basic_job():
    state = cluster([job(1, "premium", world=32, elastic=(8, 32), devices=32),
                     job(2, "basic", world=8, submit=99.0)])
    actions = plan(state, POLICY, explain_waiting=True)
    assert [(a.kind, a.job_id) for a in actions] == [(ActionKind.LEAVE, 2)]
    assert "may be shrunk or preempted for basic" in actions[0].reason


def test_a_standard_job_not_preemptible_by_premium_keeps_its_gpus():
    policy = reference_policy(standard_preemptible=False)
    state = cluster([job(1, "standard", world=32, devices=32),
                     job(2, "premium", world=8, submit=99.0)])
    assert plan(state, policy) == ()
    assert [a.kind for a in plan(state, POLICY)] == [ActionKind.PREEMPT, ActionKind.START]


def test_only_device_counts_that_divide_the_world_size_are_used():
    # 10 GPUs free on 2 nodes x 8 beside a rigid 6-GPU job: W=12 can run on 1,2,3,4,6,12
    state = cluster([job(1, "premium", world=6, devices=6),
                     job(2, "basic", world=12, elastic=(1, 12), submit=1.0)], nodes=2)
    # (by default a job starts at its MAX only and grows once it has run; this
    # is about the sizes it may take)
    actions = plan(state, POLICY, settings=PlannerSettings(start_at_max=False, grow_payback=0))
    assert [(a.kind, a.job_id, a.devices_to) for a in actions] == [(ActionKind.START, 2, 6)]


def test_shrinking_lower_tiers_comes_before_preempting_anything():
    state = cluster([job(1, "basic", world=16, elastic=(4, 16), devices=16),
                     job(2, "basic", world=16, devices=16),
                     job(3, "premium", world=8, submit=99.0)])
    actions = plan(state, POLICY)
    assert [(a.kind, a.job_id, a.devices_to) for a in actions] == [
        (ActionKind.SHRINK, 1, 8), (ActionKind.START, 3, 8)]


def test_a_premium_job_preempts_a_rigid_basic_job_when_shrinking_is_not_enough():
    state = cluster([job(1, "basic", world=32, devices=32), job(2, "premium", world=8, submit=99.0)])
    actions = plan(state, POLICY)
    assert [(a.kind, a.job_id, a.devices_to) for a in actions] == [
        (ActionKind.PREEMPT, 1, 0), (ActionKind.START, 2, 8)]
    assert "checkpoint" in actions[0].reason


def test_devices_lent_from_idle_gpus_go_back_to_a_job_of_the_same_tier():
    state = cluster([job(1, "basic", "a", world=32, elastic=(8, 32), devices=32),
                     job(2, "basic", "b", world=8, submit=99.0)])
    actions = plan(state, POLICY)
    assert [(a.kind, a.job_id, a.devices_to) for a in actions] == [
        (ActionKind.SHRINK, 1, 16), (ActionKind.START, 2, 8)]
    assert "on loan" in actions[0].reason


def test_an_account_at_its_quota_waits_with_the_quota_as_the_reason():
    policy = reference_policy(quotas={"a": 8})
    state = cluster([job(1, "basic", "a", world=8, devices=8), job(2, "basic", "a", world=8, submit=9)])
    actions = plan(state, policy, explain_waiting=True)
    assert [(a.kind, a.job_id) for a in actions] == [(ActionKind.LEAVE, 2)]
    assert "gpu_quota" in actions[0].reason


def test_an_account_at_its_quota_makes_room_for_its_standard_job_by_shrinking_its_basic_one():
    """Quota is the account's running total; its own lower-tier work gives
    way to its higher-tier job (the other account's job is not touched)."""
    policy = reference_policy(quotas={"a": 16})
    state = cluster([job(1, "basic", "a", world=16, elastic=(8, 16), devices=16),
                     job(2, "basic", "b", world=16, devices=16),
                     job(3, "standard", "a", world=8, submit=50.0)], nodes=4)
    actions = plan(state, policy)
    got = [(a.kind, a.job_id, a.devices_to) for a in actions]
    assert got == [(ActionKind.SHRINK, 1, 8), (ActionKind.START, 3, 8)], got
    assert "gpu_quota of 16" in actions[0].reason and actions[0].for_job == 3
    held = sum(j.devices for j in apply_actions(state, actions).jobs if j.account == "a")
    assert held <= 16


def test_an_account_at_its_quota_preempts_its_own_rigid_basic_job_for_its_standard_job():
    policy = reference_policy(quotas={"a": 8})
    state = cluster([job(1, "basic", "a", world=8, devices=8),
                     job(2, "standard", "a", world=8, submit=50.0)], nodes=1)
    actions = plan(state, policy)
    assert [(a.kind, a.job_id, a.devices_to) for a in actions] == [
        (ActionKind.PREEMPT, 1, 0), (ActionKind.START, 2, 8)]


def test_an_account_at_its_quota_does_not_displace_its_own_job_when_that_would_not_be_enough():
    """Its basic job holds 4 of its quota of 8; the standard job needs 8 but
    the cluster has no other free GPU: nothing is touched, the job waits."""
    policy = reference_policy(quotas={"a": 8})
    state = cluster([job(1, "basic", "a", world=4, devices=4),
                     job(2, "premium", "b", world=4, devices=4),
                     job(3, "standard", "a", world=8, submit=50.0)], nodes=1)
    actions = plan(state, policy, explain_waiting=True)
    assert [(a.kind, a.job_id) for a in actions] == [(ActionKind.LEAVE, 3)], actions


def test_every_action_explains_itself_from_the_policy():
    state = cluster([job(1, "basic", world=32, elastic=(8, 32), devices=32),
                     job(2, "standard", world=8, submit=50.0),
                     job(3, "premium", world=8, submit=60.0)])
    actions = plan(state, POLICY)
    assert actions
    for a in actions:
        assert a.reason and ("tier" in a.reason or "preemptible_by" in a.reason), a


def test_the_same_state_gives_the_same_actions():
    jobs = [job(k, ("basic", "standard", "premium")[k % 3], f"acct{k % 4}", world=8,
                elastic=(2, 8), submit=k) for k in range(1, 30)]
    state = cluster(jobs)
    assert plan(state, POLICY) == plan(state, POLICY)


def test_a_job_whose_tier_is_not_in_the_policy_is_refused_by_name():
    from slurm_singularity.policy.api import Defaults, Policy, Tier
    basic = POLICY.tiers[Tier.BASIC]
    policy = Policy(tiers={Tier.BASIC: type(basic)(Tier.BASIC, "basic", 10, basic.preempt_mode, 0,
                                                   "USR1", 0.0, ())},
                    accounts={}, defaults=Defaults(Tier.BASIC, None))
    with pytest.raises(SchedError, match="job 1: tier 'premium'"):
        plan(cluster([job(1, "premium")]), policy)
