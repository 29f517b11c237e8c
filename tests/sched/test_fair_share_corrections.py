"""Fair share between accounts of one tier, with hysteresis on: a job over
its account's share gives GPUs back to an account below its own even if it
was just sized, corrections narrow the gap and never swing back, and a
resize in flight (the daemon's) holds the next correction of its account."""

from __future__ import annotations

import dataclasses

import pytest

from slurm_singularity.sched.api import ActionKind, ClusterState, JobPhase, SchedError
from slurm_singularity.sched.apply import apply_actions
from slurm_singularity.sched.planner import plan
from slurm_singularity.sched.sim.policies import reference_policy

from sched_shapes import cluster, job

POLICY = reference_policy(weights={"a": 2.0, "b": 1.0})
NOW = 10_000.0


def held(state) -> dict[str, int]:
    out = {"a": 0, "b": 0}
    for j in state.jobs:
        out[j.account] += j.devices
    return out


def settle(state, passes: int = 12):
    """Plan and apply until nothing changes; a job that changes size is
    sized at that pass (hysteresis counts from it). Returns the last state
    and the number of actions per pass."""
    counts = []
    for _ in range(passes):
        actions = plan(state, POLICY)
        counts.append(len(actions))
        after = apply_actions(state, actions)
        changed = {a.job_id for a in actions}
        jobs = tuple(dataclasses.replace(j, sized_at=state.now if j.job_id in changed
                                         else j.sized_at) for j in after.jobs)
        state = dataclasses.replace(after, now=state.now + 2.0, jobs=jobs)
    return state, counts


def eight_jobs(devices_a, devices_b, sized_at=NOW - 5):
    """Four elastic basic jobs (W=8, 1:8) per account; ``devices_*`` their sizes (0: pending)."""
    jobs = []
    for k, d in enumerate(list(devices_a) + list(devices_b)):
        j = job(k + 1, "basic", "a" if k < 4 else "b", world=8, elastic=(1, 8), devices=d,
                submit=float(k))
        jobs.append(dataclasses.replace(j, sized_at=sized_at if d else None))
    return cluster(jobs, now=NOW)


def test_a_job_just_sized_gives_gpus_back_to_an_account_below_its_share():
    # account b got its jobs going first (28 GPUs), five seconds ago; a, with
    # twice b's weight, holds 4: hysteresis must not keep b above its share
    state = eight_jobs([1, 1, 1, 1], [8, 8, 8, 4])
    actions = plan(state, POLICY)
    assert any(a.kind is ActionKind.SHRINK and a.job_id > 4 for a in actions), actions
    shrink = next(a for a in actions if a.kind is ActionKind.SHRINK)
    assert "fair-share correction" in shrink.reason and "hysteresis does not hold it" in shrink.reason
    grown = next(a for a in actions if a.kind is ActionKind.GROW)
    assert grown.job_id <= 4 and "for fair share" in grown.reason


def test_shares_settle_near_two_to_one_and_then_nothing_moves():
    for start in ([1, 1, 1, 1], [8, 8, 8, 8], [0, 0, 0, 0]):
        state, counts = settle(eight_jobs(start, [8, 8, 8, 4] if sum(start) < 32 else [0] * 4))
        share = held(state)
        assert share["a"] + share["b"] == 32, (start, share)
        assert 1.8 <= share["a"] / share["b"] <= 2.2, (start, share)
        assert counts[-4:] == [0, 0, 0, 0], (start, counts)


def test_pending_jobs_of_an_account_below_its_share_start_below_max_rather_than_wait():
    # a holds 24 on three jobs at MAX, b 8 on one; b's next job would need
    # 8 GPUs at MAX, more than fair share may take from a: it starts smaller
    state = eight_jobs([8, 8, 8, 0], [8, 0, 0, 0])
    actions = plan(state, POLICY)
    started = [a for a in actions if a.kind is ActionKind.START]
    assert started and started[0].job_id > 4 and 0 < started[0].devices_to < 8, actions
    after = held(apply_actions(state, actions))
    assert after["b"] * 2 <= after["a"] + 8, after


def test_a_resize_in_flight_holds_the_next_correction_of_its_account():
    state = eight_jobs([1, 1, 1, 1], [8, 8, 8, 4])
    jobs = list(state.jobs)
    # job 8 (account b) is being resized by the daemon: the next correction
    # between a and b waits until it lands
    jobs[7] = dataclasses.replace(jobs[7], phase=JobPhase.RESIZING)
    waiting = dataclasses.replace(state, jobs=tuple(jobs))
    assert [a for a in plan(waiting, POLICY) if a.kind is not ActionKind.LEAVE] == []
    assert plan(state, POLICY)


def test_a_job_resized_by_a_requeue_restarts_at_its_new_size_not_at_its_max():
    restarting = dataclasses.replace(job(1, "basic", "a", world=8, elastic=(1, 8)),
                                     restart_size=4)
    actions = plan(cluster([restarting], now=NOW), POLICY)
    assert [(a.kind, a.job_id, a.devices_to) for a in actions] == [(ActionKind.START, 1, 4)]
    # while it restarts, account a's share is not corrected from b's loans
    state = eight_jobs([1, 1, 1, 0], [8, 8, 8, 4])
    jobs = list(state.jobs)
    jobs[3] = dataclasses.replace(jobs[3], restart_size=1)
    actions = plan(dataclasses.replace(state, jobs=tuple(jobs)), POLICY)
    assert not any(a.kind is ActionKind.SHRINK for a in actions), actions


def test_a_restart_size_that_does_not_fit_the_job_is_refused_by_name():
    with pytest.raises(SchedError, match="restart_size"):
        dataclasses.replace(job(1, "basic", world=8, elastic=(1, 8)), restart_size=3)
    with pytest.raises(SchedError, match="restart_size"):
        dataclasses.replace(job(1, "basic", world=8, elastic=(1, 8), devices=4), restart_size=4)


def test_a_state_given_its_gpu_sums_keeps_them_and_refuses_impossible_ones_by_name():
    # the simulator keeps the sums as its nodes change instead of summing
    # 12,500 nodes on every pass
    state = cluster([job(1, "basic", world=8, devices=8)])
    kept = ClusterState(state.now, state.nodes, state.jobs, sums=(32, 24))
    assert (kept.total_gpus, kept.free_gpus) == (32, 24) == (state.total_gpus, state.free_gpus)
    with pytest.raises(SchedError, match="sums"):
        ClusterState(state.now, state.nodes, state.jobs, sums=(32, 33))
