"""A job that does not stop when the daemon signals it is requeued after its
tier's grace time, and killed one grace time later if it still runs: one
step per grace time, each logged once (issue 19, item 5: a job ignoring
SIGTERM blocked a premium job forever, signalled again every pass)."""

from __future__ import annotations

import logging

from fake_slurm import Clock, FakeJob, FakeSlurm, run_for, tag

BASIC_GRACE_S = 30      # templates/policy.toml, tiers.basic.grace_time_s


def cluster_with_a_premium_job_waiting(ckpt_s: float | None, requeue_ignored: bool = False):
    """A basic elastic job on all 32 GPUs, then a premium job for 16."""
    slurm = FakeSlurm(Clock())
    slurm.add(FakeJob(1, "basic", tag("basic", 8, 32, 32), 4, 8, ckpt_s=ckpt_s,
                      requeue_ignored=requeue_ignored), running=True)
    slurm.add(FakeJob(2, "premium", tag("premium", 16, 16, 16), 2, 8, account="research"))
    return slurm


def test_a_job_that_ignores_sigterm_is_requeued_after_its_grace_time_and_signalled_once(
        tmp_path, caplog):
    slurm = cluster_with_a_premium_job_waiting(ckpt_s=None)
    caplog.set_level(logging.INFO)
    run_for(slurm, 200, tmp_path / "journal")
    signalled_at = next(t for t, what, j, _ in slurm.calls if what == "signal" and j == 1)
    requeues = [t for t, what, j, _ in slurm.calls if what == "requeue" and j == 1]
    assert slurm.signals_to(1) == ["TERM"], slurm.calls
    assert len(requeues) == 1, slurm.calls
    assert BASIC_GRACE_S <= requeues[0] - signalled_at <= BASIC_GRACE_S + 1
    # the premium job got its GPUs, the basic job came back at 16
    assert slurm.fake_jobs[2].state == "RUNNING"
    assert (slurm.fake_jobs[1].state, slurm.fake_jobs[1].gpus) == ("RUNNING", 16)
    steps = [r.getMessage() for r in caplog.records if "after SIGTERM" in r.getMessage()]
    assert len(steps) == 1 and "requeued it" in steps[0], steps


def test_a_job_still_running_after_its_requeue_is_killed_one_grace_time_later(tmp_path, caplog):
    slurm = cluster_with_a_premium_job_waiting(ckpt_s=None, requeue_ignored=True)
    caplog.set_level(logging.INFO)
    run_for(slurm, 200, tmp_path / "journal")
    times = {what: [t for t, w, j, _ in slurm.calls if w == what and j == 1]
             for what in ("signal", "requeue")}
    assert slurm.signals_to(1) == ["TERM", "KILL"], slurm.calls
    assert len(times["requeue"]) == 1
    term, kill = times["signal"]
    assert times["requeue"][0] - term >= BASIC_GRACE_S
    assert kill - times["requeue"][0] >= BASIC_GRACE_S
    assert slurm.fake_jobs[2].state == "RUNNING"
    kills = [r.getMessage() for r in caplog.records if "killed it" in r.getMessage()]
    assert len(kills) == 1, kills


def test_a_job_that_checkpoints_within_its_grace_time_is_neither_requeued_nor_killed(tmp_path):
    slurm = cluster_with_a_premium_job_waiting(ckpt_s=BASIC_GRACE_S - 5)
    run_for(slurm, 200, tmp_path / "journal")
    assert slurm.signals_to(1) == ["TERM"]
    assert slurm.count("requeue", 1) == 0
    assert slurm.fake_jobs[1].restart_count == 1            # by its own requeue exit
    assert (slurm.fake_jobs[1].state, slurm.fake_jobs[1].gpus) == ("RUNNING", 16)


def test_a_mark_left_from_an_earlier_run_is_not_escalated(tmp_path):
    """The daemon signalled a grow, then was down while Slurm requeued the
    job and started it again at its old size: the mark is the earlier
    run's, and the new run is not requeued for it."""
    slurm = FakeSlurm(Clock())
    slurm.add(FakeJob(1, "basic", tag("basic", 8, 32, 32), 1, 8), running=True)
    run_for(slurm, 0.5, tmp_path / "journal")                  # mark and signal the grow
    assert slurm.signals_to(1) == ["TERM"]
    slurm.clock.now += 2 * BASIC_GRACE_S                       # the daemon is down
    slurm.tick()
    assert (slurm.fake_jobs[1].state, slurm.fake_jobs[1].gpus) == ("RUNNING", 8)
    run_for(slurm, 60, tmp_path / "journal")
    assert slurm.count("requeue", 1) == 0, slurm.calls
    assert (slurm.fake_jobs[1].state, slurm.fake_jobs[1].gpus) == ("RUNNING", 32)
    assert slurm.signals_to(1) == ["TERM", "TERM"]             # the grow, decided anew
