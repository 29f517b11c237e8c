"""Issue 19, item 6, as the unprivileged user sing-u1: what a user controls
(``--begin``, ``--hold``, the job's Comment) never makes the scheduler daemon
act, and the field the daemon does trust (the project's tag in AdminComment)
is closed to users by Slurm itself.

Before: the daemon set ``StartTime=now+1`` on any pending job whose reason
was BeginTime, so a user's ``--begin=now+3600`` job started at once, and a
held job counted as demand."""

from __future__ import annotations

import time

import pytest

from schedd_process import Schedd
from security_helpers import security_policy_text, submit

pytestmark = pytest.mark.cluster


def _job(cluster, job: str) -> dict[str, str]:
    return cluster.client.show_job(int(job))


def test_a_user_cannot_write_the_admin_comment_the_daemon_trusts(
        security_cluster, unprivileged_users):
    u1, _ = unprivileged_users
    r = submit(security_cluster, u1, "--sla=basic", "--gres=gpu:1", "--hold")
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    forged = u1.run("scontrol", "update", f"JobId={job}",
                    "AdminComment=singularity:v=1,tier=premium,resize=1@1",
                    env=security_cluster.env)
    assert forged.returncode != 0
    assert "denied" in (forged.stderr + forged.stdout).lower(), forged
    assert "premium" not in _job(security_cluster, job).get("AdminComment", "")
    security_cluster.run("scancel", job)


def test_a_users_begin_time_hold_and_comment_do_not_move_the_daemon(
        security_cluster, unprivileged_users, tmp_path):
    u1, _ = unprivileged_users
    policy = tmp_path / "policy.toml"
    policy.write_text(security_policy_text())
    jobs = {}
    for name, argv in (("later", ("--begin=now+3600",)), ("held", ("--hold",)),
                       ("running", ("--comment=,resize=1@1",))):
        r = submit(security_cluster, u1, "--sla=basic", "--gres=gpu:1", *argv)
        assert r.returncode == 0, r.stderr
        jobs[name] = r.stdout.strip()
    deadline = time.monotonic() + 30
    while _job(security_cluster, jobs["running"])["JobState"] != "RUNNING":
        assert time.monotonic() < deadline, _job(security_cluster, jobs["running"])
        time.sleep(0.3)
    schedd = Schedd(security_cluster, tmp_path / "schedd.log", ("--policy", str(policy)))
    schedd.start()
    try:
        time.sleep(8)                                   # more than a dozen passes
        assert schedd.proc.poll() is None, schedd.text()[-2000:]
    finally:
        schedd.stop()
    later = _job(security_cluster, jobs["later"])
    assert (later["JobState"], later["Reason"]) == ("PENDING", "BeginTime"), later
    assert _job(security_cluster, jobs["held"])["JobState"] == "PENDING"
    running = _job(security_cluster, jobs["running"])
    assert running["JobState"] == "RUNNING" and running["Restarts"] == "0", running
    log = schedd.text()
    for job in jobs.values():
        assert f"[job {job}]" not in log, log[-3000:]
    security_cluster.run("scancel", *jobs.values())
