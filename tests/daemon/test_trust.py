"""The daemon acts only on what a user cannot forge (issue 19, item 6): a
``--begin`` is never cut short, held and begin-time jobs are no demand, marks
come only from the project's own tag, and a bad tag is refused whole and
reported once, briefly."""

from __future__ import annotations

import logging

import pytest

from fake_slurm import Clock, FakeJob, FakeSlurm, run_for, tag


@pytest.mark.parametrize("restarts, begins_in, released", [
    pytest.param(0, 3600, False, id="a users begin time is never cut short"),
    pytest.param(1, 120, True, id="a job requeued by Slurms preemption is released at once"),
    pytest.param(1, 3600, False, id="a user who requeues a job and sets a later start is not"),
])
def test_only_a_requeue_delay_is_cut_short(tmp_path, restarts, begins_in, released):
    slurm = FakeSlurm(Clock())
    now = slurm.clock.now
    slurm.add(FakeJob(3, "basic", tag("basic", 1, 1, 1), 1, 1, reason="BeginTime",
                      restart_count=restarts, submit_time=now - 1, eligible_time=now + begins_in))
    run_for(slurm, 10, tmp_path / "journal")
    assert slurm.count("update", 3, "StartTime=now+1") == released, slurm.calls
    assert slurm.fake_jobs[3].state == ("RUNNING" if released else "PENDING")


def test_held_and_begin_time_jobs_shrink_nobody(tmp_path):
    slurm = FakeSlurm(Clock())
    now = slurm.clock.now
    slurm.add(FakeJob(1, "basic", tag("basic", 8, 32, 32), 4, 8), running=True)
    slurm.add(FakeJob(2, "premium", tag("premium", 16, 16, 16), 2, 8, account="research",
                      reason="JobHeldUser", priority=0))
    slurm.add(FakeJob(3, "premium", tag("premium", 8, 8, 8), 1, 8, account="research",
                      reason="JobHeldAdmin", priority=0))
    slurm.add(FakeJob(4, "premium", tag("premium", 16, 16, 16), 2, 8, account="research",
                      reason="BeginTime", eligible_time=now + 3600))
    run_for(slurm, 20, tmp_path / "journal")
    assert slurm.calls == [], slurm.calls
    assert slurm.fake_jobs[1].gpus == 32


def test_a_resize_mark_outside_the_projects_tag_is_not_acted_on(tmp_path):
    slurm = FakeSlurm(Clock())
    # an operator's AdminComment with a stale mark in it, on two running jobs
    slurm.add(FakeJob(1, "basic", "resize=16@1", 2, 8), running=True)
    slurm.add(FakeJob(2, "basic", "moved by ops,resize=0@1", 2, 8), running=True)
    run_for(slurm, 200, tmp_path / "journal")
    assert slurm.signals_to(1) == [] and slurm.signals_to(2) == [], slurm.calls
    assert slurm.count("requeue", 1) == slurm.count("requeue", 2) == 0
    assert [j.state for j in slurm.fake_jobs.values()] == ["RUNNING", "RUNNING"]


def test_a_tag_with_an_unknown_tier_is_refused_whole_with_one_warning(tmp_path, caplog):
    slurm = FakeSlurm(Clock())
    # the tag says elastic 8:32; refused whole, the job is rigid at its 8 GPUs
    slurm.add(FakeJob(1, "basic", "singularity:sla=gold,elastic=8:32,ws=32", 1, 8),
              running=True)
    caplog.set_level(logging.WARNING)
    run_for(slurm, 20, tmp_path / "journal")
    assert slurm.calls == [], slurm.calls
    warnings = [r.getMessage() for r in caplog.records if "[job 1]" in r.getMessage()]
    assert len(warnings) == 1 and "unknown tier 'gold'" in warnings[0], warnings


def test_a_huge_malformed_tag_is_reported_once_and_briefly(tmp_path, caplog):
    slurm = FakeSlurm(Clock())
    slurm.add(FakeJob(1, "basic", "singularity:" + "x" * 100_000, 1, 8), running=True)
    caplog.set_level(logging.WARNING)
    run_for(slurm, 20, tmp_path / "journal")
    warnings = [r.getMessage() for r in caplog.records if "[job 1]" in r.getMessage()]
    assert len(warnings) == 1, len(warnings)
    assert len(warnings[0]) < 600, len(warnings[0])
    assert "100012 characters" in warnings[0], warnings[0][:600]


def test_a_malformed_mark_in_a_tag_leaves_its_job_alone_names_the_field_once_and_others_run(
        tmp_path, caplog):
    # an older version or an admin wrote a mark the daemon cannot read
    slurm = FakeSlurm(Clock())
    slurm.add(FakeJob(1, "basic", tag("basic", 8, 32, 32) + ",resize=16@soon", 2, 8),
              running=True)
    slurm.add(FakeJob(3, "basic", tag("basic", 8, 16, 16), 1, 8), running=True)
    caplog.set_level(logging.WARNING)
    run_for(slurm, 60, tmp_path / "journal")
    assert [c for c in slurm.calls if c[2] == 1] == [], slurm.calls
    assert slurm.fake_jobs[1].admin_comment.endswith(",resize=16@soon")
    warnings = [r.getMessage() for r in caplog.records if "[job 1]" in r.getMessage()]
    assert len(warnings) == 1 and "AdminComment resize: cannot read '16@soon'" in warnings[0], \
        warnings
    assert (slurm.fake_jobs[3].state, slurm.fake_jobs[3].gpus) == ("RUNNING", 16), slurm.calls
