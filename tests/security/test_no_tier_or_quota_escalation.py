"""Issue 19, items 1 and 2, as real unprivileged users (sing-u1, sing-u2)
on the test cluster: a premium tier through an account the user is not in,
a held job reshaped with scontrol update, a node range counted at its
minimum, and jobs of one account beyond its gpu_quota are each refused,
with a message (or a Slurm pending reason) that names the rule."""

from __future__ import annotations

import time

import pytest

from security_helpers import submit

pytestmark = pytest.mark.cluster


def _job_id(r) -> int:
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().split(";")[0])


def test_premium_through_an_account_the_user_is_not_in_is_refused(
        security_cluster, unprivileged_users):
    u1 = unprivileged_users[0]
    r = submit(security_cluster, u1, "--account=research", "--sla=premium")
    assert r.returncode != 0, f"sbatch accepted: {r.stdout}"
    assert ("--account=research: user sing-u1 is not a member of account research "
            "(the policy's accounts.research.members)") in r.stderr
    # without --account the job runs under u1's default account (small), so the
    # tier is decided on that account
    r = submit(security_cluster, u1, "--sla=premium")
    assert r.returncode != 0, f"sbatch accepted: {r.stdout}"
    assert ("--sla=premium: account small may not use this tier (allowed: basic; "
            "the policy's accounts.small.tiers)") in r.stderr, r.stderr
    # what sing-u1 may have: its own account and tier
    job = _job_id(submit(security_cluster, u1, "--hold", "--sla=basic"))
    rec = security_cluster.client.show_job(job)
    security_cluster.run("scancel", str(job))
    assert (rec["Account"], rec["Partition"]) == ("small", "basic")


def test_an_account_without_an_association_is_refused_by_slurm(security_cluster,
                                                               unprivileged_users):
    # "default" lists no members: the policy lets Slurm's associations decide,
    # and sing-u1 has none there (AccountingStorageEnforce=associations)
    r = submit(security_cluster, unprivileged_users[0], "--account=default", "--sla=basic")
    assert r.returncode != 0, f"sbatch accepted: {r.stdout}"
    assert "Invalid account" in r.stderr, r.stderr


def test_a_held_job_cannot_be_reshaped_by_its_user(security_cluster, unprivileged_users):
    u1 = unprivileged_users[0]
    job = _job_id(submit(security_cluster, u1, "--hold", "--sla=basic", "--gres=gpu:1"))
    try:
        r = u1.run("scontrol", "update", f"JobId={job}", "NumNodes=2-2",
                   "TresPerNode=gres:gpu:4", env=security_cluster.env)
        assert r.returncode != 0, "scontrol update was accepted"
        assert "accounting/QOS policy" in r.stderr, r.stderr
        log = (security_cluster.spec.state_dir / "log" / "slurmctld.log").read_text()
        assert ("job update refused: --elastic=1:1: the job asks for 8 GPUs" in log), \
            "the rule is not in slurmctld's log"
        r = u1.run("scontrol", "update", f"JobId={job}", "Partition=premium",
                   env=security_cluster.env)
        assert r.returncode != 0 and "Access/permission denied" in r.stderr, r.stderr
        r = u1.run("scontrol", "update", f"JobId={job}", "Account=research",
                   env=security_cluster.env)
        assert r.returncode != 0 and "Invalid account" in r.stderr, r.stderr
        # a change within the rules still goes through
        r = u1.run("scontrol", "update", f"JobId={job}", "TimeLimit=30",
                   env=security_cluster.env)
        assert r.returncode == 0, r.stderr
        r = u1.run("scontrol", "release", str(job), env=security_cluster.env)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 30
        while (rec := security_cluster.client.show_job(job))["JobState"] != "RUNNING":
            assert time.monotonic() < deadline, f"job still {rec['JobState']}"
            time.sleep(0.5)
        assert rec["NumNodes"] == "1", rec
        assert "gres/gpu=1" in rec.get("TRES", ""), rec
    finally:
        security_cluster.run("scancel", str(job))


def test_a_node_range_is_counted_at_its_most_gpus(security_cluster, unprivileged_users):
    r = submit(security_cluster, unprivileged_users[0], "--sla=basic", "-N1-2", "--gres=gpu:2")
    assert r.returncode != 0, f"sbatch accepted: {r.stdout}"
    assert "the job may hold 4 GPUs but account small has a gpu_quota of 2" in r.stderr, r.stderr


def test_jobs_of_an_account_beyond_its_gpu_quota_do_not_all_run(security_cluster,
                                                                unprivileged_users):
    u1 = unprivileged_users[0]
    jobs = [_job_id(submit(security_cluster, u1, "--sla=basic", "--gres=gpu:2"))
            for _ in range(4)]
    try:
        deadline = time.monotonic() + 20
        while True:
            recs = [security_cluster.client.show_job(j) for j in jobs]
            running = [r for r in recs if r["JobState"] == "RUNNING"]
            pending = [r for r in recs if r["JobState"] == "PENDING"]
            if running and len(pending) == 3 and all(
                    r["Reason"].startswith("AssocGrp") for r in pending):
                break
            assert len(running) <= 1, [(r["JobId"], r["JobState"]) for r in recs]
            assert time.monotonic() < deadline, [(r["JobState"], r["Reason"]) for r in recs]
            time.sleep(0.5)
        # held there: a few more scheduling passes start nothing more
        time.sleep(5)
        recs = [security_cluster.client.show_job(j) for j in jobs]
        assert sum(r["JobState"] == "RUNNING" for r in recs) == 1
        # Slurm names the rule: the association's group GRES limit
        assert {r["Reason"] for r in recs if r["JobState"] == "PENDING"} == {"AssocGrpGRES"}
    finally:
        security_cluster.run("scancel", *map(str, jobs))
