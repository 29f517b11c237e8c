"""`singularity-admin status` on the real local Slurm marks a transparent
job as such (table and --json), and leaves other jobs unmarked (status
lists the jobs that hold or ask for GPUs); the mark
comes from the job's tag, which a user cannot change."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

BIN = Path(sys.executable).parent


def _status(cluster, *args: str) -> str:
    r = subprocess.run([str(BIN / "singularity-admin"), "status", *args], env=cluster.env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_status_marks_the_transparent_job_and_not_the_other(slurm_cluster, unprivileged_users):
    user = unprivileged_users[0]
    slurm_cluster.run("sacctmgr", "-i", "add", "user", user.name, "account=default")
    jobs = []
    try:
        for extra in (("--transparent",), ()):
            r = user.run("sbatch", "--parsable", "--hold", "-o", "/dev/null", "--sla=basic",
                         "--account=default", "--gres=gpu:1", *extra, "--wrap", "sleep 60",
                         env=slurm_cluster.env)
            assert r.returncode == 0, r.stderr
            jobs.append(int(r.stdout.strip().split(";")[0]))
        transparent, plain = jobs
        # a user cannot take the mark off (AdminComment is root's)
        r = user.run("scontrol", "update", f"JobId={transparent}", "AdminComment=x",
                     env=slurm_cluster.env)
        assert r.returncode != 0, r.stdout
        data = {j["job_id"]: j for j in json.loads(_status(slurm_cluster, "--json"))["jobs"]}
        assert data[transparent]["transparent"] is True, data[transparent]
        assert data[plain]["transparent"] is False, data[plain]
        table = _status(slurm_cluster)
        rows = {int(line.split()[0]): line for line in table.splitlines()[2:]}
        assert "MODE" in table.splitlines()[1], table
        assert " transparent " in rows[transparent], table
        assert " transparent " not in rows[plain], table
    finally:
        for job in jobs:
            slurm_cluster.run("scancel", str(job))
