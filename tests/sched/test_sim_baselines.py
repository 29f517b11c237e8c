"""Each baseline of the simulator does what its documentation says, on hand-made traces.

The expected times are computed from the measured costs of
``sched/sim/constants.py`` (never typed in), so a re-measured constant
changes them and the tests still say what they mean.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from slurm_singularity.policy.api import Tier
from slurm_singularity.sched.sim import constants as C
from slurm_singularity.sched.sim.engine import Engine, SimJob
from slurm_singularity.sched.sim.policies import reference_policy
from slurm_singularity.sched.sim.run import SimSpec, simulate
from slurm_singularity.sched.sim.slurm import SlurmScheduler
from slurm_singularity.sched.sim.trace import assign_tiers, read_trace

POLICY = reference_policy()
DAY = "2017-10-01"


def philly(tmp: Path, rows: list[tuple[float, float, int, str]]) -> Path:
    """A Philly trace; each row (seconds after midnight, duration, GPUs, account)."""
    path = tmp / "t.csv"
    lines = ["timestamp,duration,num_gpus,gpu_time,cluster"]
    for t, d, g, c in rows:
        lines.append(f"{DAY} {int(t) // 3600:02d}:{int(t) % 3600 // 60:02d}:{int(t) % 60:02d},"
                     f"{d},{g},{d * g},{c}")
    path.write_text("\n".join(lines) + "\n")
    return path


def jobs_of(trace: Path, scheduler: str, gpus: int = 8, rule: str = "size:1/4") -> dict[int, SimJob]:
    engine, _ = simulate(SimSpec(trace, scheduler, gpus, POLICY, tier_rule=rule))
    return {j.job_id: j for j in engine.done}


def tick(t: float, period: float) -> float:
    return math.ceil(t / period) * period


# -- tiresias: the artifact's 2D-LAS -------------------------------------------------

def test_tiresias_demotes_a_job_past_its_queue_limit_and_a_newer_job_takes_its_gpus(tmp_path):
    # A (8 GPUs, long) runs alone; B (8 GPUs) waits in Q0 behind it until A has
    # attained 3,250 GPU-seconds and drops to Q1.
    jobs = jobs_of(philly(tmp_path, [(0, 5000.0, 8, "a"), (10, 100.0, 8, "b")]), "tiresias")
    a, b = jobs[0], jobs[1]
    demoted = C.TIRESIAS_THRESHOLDS_GPU_S[0] / 8
    assert b.first_start == pytest.approx(tick(demoted, C.DAEMON_PERIOD_S))
    assert a.preemptions == 1 and b.preemptions == 0
    assert a.lost_gpu_s == 0                      # preempted with a checkpoint
    assert a.end > b.end


def test_tiresias_keeps_a_running_job_ahead_of_one_that_could_not_start(tmp_path):
    # Q0 after the first passes: A runs, B (8 GPUs) cannot start, C (4 GPUs)
    # starts behind it. The artifact moves B behind the running C, so when A
    # ends, B still waits for C instead of preempting it.
    rows = [(0, 100.0, 4, "a"), (1, 100.0, 8, "b"), (2, 300.0, 4, "c")]
    jobs = jobs_of(philly(tmp_path, rows), "tiresias")
    a, b, c = jobs[0], jobs[1], jobs[2]
    assert c.first_start < a.end
    assert c.preemptions == 0
    assert b.first_start >= c.end


def test_tiresias_with_a_promotion_knob_brings_a_starving_job_back(tmp_path):
    # A (8 GPUs, long) is demoted to Q1, then a stream of short 8-GPU jobs
    # keeps Q0 busy. Without promotion A waits for all of them; with knob 2 it
    # goes back to Q0 after pending twice its executed time.
    rows = [(0, 20000.0, 8, "a")] + [(10 + 300 * k, 300.0, 8, "b") for k in range(12)]
    trace = philly(tmp_path, rows)
    plain, knob = jobs_of(trace, "tiresias"), jobs_of(trace, "tiresias:2")
    last_short = max(j.end for i, j in plain.items() if i)
    assert plain[0].preemptions == 1 and plain[0].end > last_short + 15000
    assert knob[0].preemptions >= 2                # promoted, ran, demoted, preempted again

    def worst_short_jct(jobs):
        return max(j.end - j.submit for i, j in jobs.items() if i)
    # a promoted A runs in Q0 ahead of the short jobs that came after it
    assert worst_short_jct(knob) > worst_short_jct(plain) + 300


def test_las_tiers_gives_a_premium_arrival_the_gpus_and_never_preempts_premium(tmp_path):
    # tiresias ignores tiers: the premium 1-GPU job waits behind a basic job in
    # Q0; las-tiers puts premium first and preempts the basic job at once.
    rows = [(0, 1000.0, 8, "a"), (100, 100.0, 1, "b"), (200, 2000.0, 1, "c"),
            (201, 100.0, 1, "d")]
    trace = philly(tmp_path, rows)
    t, las = jobs_of(trace, "tiresias"), jobs_of(trace, "las-tiers")
    assert t[1].first_start > 300 and las[1].first_start == pytest.approx(100)
    assert all(j.preemptions == 0 for j in las.values() if j.tier.value == "premium")


# -- slurm ---------------------------------------------------------------------

PREEMPTION = [(0, 1000.0, 8, "teamA"), (100, 100.0, 1, "teamB")]   # basic 8 GPUs, then premium 1


def test_slurm_preempts_with_a_grace_checkpoint_and_the_preemptor_waits_until_it_is_durable(
        tmp_path):
    jobs = jobs_of(philly(tmp_path, PREEMPTION), "slurm")
    basic, premium = jobs[0], jobs[1]
    assert basic.preemptions == 1 and basic.lost_gpu_s == 0
    free_at = 100 + C.checkpoint_s() + C.HANDOVER_S
    assert premium.end == pytest.approx(free_at + 100.0)
    # the basic job restarts when the premium one is done, then restores
    restart = tick(premium.end, C.SLURM_PERIOD_S)
    assert basic.end == pytest.approx(restart + C.restore_s() + 900.0, abs=0.5)
    assert basic.overhead_gpu_s == pytest.approx(8 * (C.checkpoint_s() + C.HANDOVER_S
                                                      + C.restore_s()), rel=0.01)


def test_slurm_no_ckpt_is_a_bound_that_loses_the_work_of_the_preempted_job(tmp_path):
    jobs = jobs_of(philly(tmp_path, PREEMPTION), "slurm-no-ckpt")
    basic, premium = jobs[0], jobs[1]
    assert basic.lost_gpu_s == pytest.approx(8 * 100.0)
    assert premium.end == pytest.approx(100 + C.HANDOVER_S + 100.0)
    assert basic.end == pytest.approx(tick(premium.end, C.SLURM_PERIOD_S) + 1000.0, abs=0.5)


def test_slurm_periodic_loses_only_the_work_since_its_last_checkpoint(tmp_path):
    jobs = jobs_of(philly(tmp_path, PREEMPTION), "slurm-periodic:30")
    cycle = 30 + C.checkpoint_s()
    since_last = 100 - math.floor(100 / cycle) * cycle
    assert jobs[0].lost_gpu_s == pytest.approx(8 * since_last, rel=0.01)
    assert 0 < jobs[0].lost_gpu_s < 8 * 30


def test_slurm_kills_a_job_whose_checkpoint_does_not_fit_in_its_grace_time(tmp_path):
    grace = POLICY.tiers[Tier.BASIC].grace_time_s
    big = C.Costs(period_s=C.SLURM_PERIOD_S, settle_s=0.0, restart_s=0.0,
                  state_bytes=(grace + 1) * C.CHECKPOINT_BYTES_PER_S)
    trace = assign_tiers(read_trace(philly(tmp_path, PREEMPTION), "philly"), "size:1/4", 0)
    engine = Engine(trace, 8, SlurmScheduler(POLICY, 8, costs=big))
    done = {j.job_id: j for j in engine.run()}
    assert done[0].lost_gpu_s == pytest.approx(8 * 100.0)     # no checkpoint: from zero


def test_slurm_starts_the_job_of_the_account_with_less_usage_first(tmp_path):
    # teamA used the cluster for 1000 s; then teamA and teamB each queue an
    # 8-GPU job, teamA's first. Fair-share puts teamB's ahead.
    rows = [(0, 1000.0, 8, "teamA"), (10, 100.0, 8, "teamA"), (20, 100.0, 8, "teamB")]
    jobs = jobs_of(philly(tmp_path, rows), "slurm", rule="size:1/8")
    assert jobs[2].first_start < jobs[1].first_start
    assert jobs[2].first_start == pytest.approx(tick(1000.0, C.SLURM_PERIOD_S))


@pytest.mark.parametrize("duration, backfilled", [(400.0, True), (1500.0, False)])
def test_slurm_backfills_a_job_whose_time_limit_ends_before_the_reservation(
        tmp_path, duration, backfilled):
    # J0 holds 4 of 8 GPUs (limit 2 x 1000 s); J1 needs all 8 and gets the
    # reservation at J0's limit; J2 (4 GPUs) may start now only if its own
    # limit (2 x its duration) ends before that.
    rows = [(0, 1000.0, 4, "a"), (10, 100.0, 8, "a"), (20, duration, 4, "a")]
    jobs = jobs_of(philly(tmp_path, rows), "slurm", rule="size:1/8")
    assert (jobs[2].first_start == pytest.approx(20.0)) is backfilled
    if not backfilled:
        assert jobs[2].first_start >= jobs[1].first_start


def test_decisions_happen_at_the_daemons_period(tmp_path):
    jobs = jobs_of(philly(tmp_path, [(0, 100.0, 1, "a"), (1, 100.0, 1, "a")]), "singularity")
    assert jobs[1].first_start == pytest.approx(tick(1, C.DAEMON_PERIOD_S))
    assert jobs[1].first_start > 1
