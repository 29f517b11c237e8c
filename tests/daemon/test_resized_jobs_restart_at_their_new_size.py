"""A job the daemon resized by a requeue restarts at its new size: while it
waits for Slurm to start it again, the planner counts it at that size
(``observe.restarting``) instead of seeing a pending job that wants its MAX,
which would undo the resize and swing GPUs back and forth between accounts."""

from __future__ import annotations

from fake_slurm import Clock, FakeJob, FakeSlurm, run_for, tag

from slurm_singularity.sched.marks import read_marks


def two_accounts_sharing_basic():
    """Account default (weight 1) holds 24 GPUs in three elastic basic jobs
    that have run an hour; account research (weight 2) holds 8 and submits
    a second elastic job: fair share moves GPUs from default to research."""
    slurm = FakeSlurm(Clock())
    for k in (1, 2, 3):
        slurm.add(FakeJob(k, "basic", tag("basic", 1, 8, 8), 1, 8), running=True)
        slurm.fake_jobs[k].start_time -= 3600
    slurm.add(FakeJob(4, "basic", tag("basic", 1, 8, 8), 1, 8, account="research"),
              running=True)
    slurm.add(FakeJob(5, "basic", tag("basic", 1, 8, 8), 1, 1, account="research"))
    return slurm


def held(slurm, account):
    return sum(j.gpus for j in slurm.fake_jobs.values()
               if j.account == account and j.state == "RUNNING")


def test_a_job_shrunk_for_fair_share_restarts_at_its_new_size_and_is_left_there(tmp_path):
    slurm = two_accounts_sharing_basic()
    run_for(slurm, 300, tmp_path / "journal")
    shrunk = [k for k in (1, 2, 3) if slurm.signals_to(k)]
    assert shrunk, slurm.calls
    for k in (1, 2, 3):
        # one resize each at most: none is started at its MAX again and shrunk again
        assert len(slurm.signals_to(k)) <= 1, (k, slurm.calls)
    for k in shrunk:
        job = slurm.fake_jobs[k]
        assert job.state == "RUNNING" and job.gpus < 8, (k, job)
        assert read_marks(job.admin_comment).resized == job.gpus
    assert all(j.state == "RUNNING" for j in slurm.fake_jobs.values())
    # research, below its share, got both its jobs to their MAX; default keeps the rest
    assert (held(slurm, "research"), held(slurm, "default")) == (16, 16)
