"""The admin view of a federation: `singularity-admin status --federation`
shows every cluster with its GPUs by tier and its jobs (a pending job once,
under its origin), and the placer's metrics carry a cluster label."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from slurm_singularity.sched.federation import FederationPlacer, Member
from slurm_singularity.sched.migrate import InFlight, MigrationJournal, MigrationStep
from slurm_singularity.slurm.cli import CliSlurmClient

pytestmark = pytest.mark.cluster

ADMIN = [sys.executable, "-m", "slurm_singularity.cli.admin"]


def submit(fed, member: str, *args: str) -> int:
    out = fed.run(member, "sbatch", "--parsable", *args).stdout
    return int(out.strip().split(";")[0])


def test_status_shows_every_cluster_with_its_own_jobs_and_gpus_by_tier(fed):
    on_east = submit(fed, "east", "--clusters=east", "--gres=gpu:8", "-o", "/dev/null",
                     "--wrap", "sleep 300")
    on_west = submit(fed, "west", "--clusters=west", "--sla=basic", "--gres=gpu:4",
                     "-o", "/dev/null", "--wrap", "sleep 300")
    waiting = submit(fed, "east", "--begin=now+600", "--gres=gpu:2", "-o", "/dev/null",
                     "--wrap", "sleep 1")
    fed.wait_until(lambda: fed.running_on(on_east) == "east" and
                   fed.running_on(on_west) == "west", "both jobs to run")
    r = subprocess.run([*ADMIN, "status", "--federation", str(fed.spec.state_dir), "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["federation"] == "testfed"
    east, west = data["clusters"]["east"], data["clusters"]["west"]
    assert (east["total_gpus"], east["free_gpus"]) == (16, 8)
    assert (west["total_gpus"], west["free_gpus"]) == (16, 12)
    assert west["gpus_per_tier"]["basic"] == 4 and east["gpus_per_tier"]["basic"] == 0
    assert {j["job_id"] for j in east["jobs"]} == {on_east, waiting}
    assert {j["job_id"] for j in west["jobs"]} == {on_west}     # not the waiting copy

    assert data["migrations"] == []

    MigrationJournal(fed.spec.state_dir / "migrations.json").put(
        InFlight(waiting, "east", "west", "ckpt/x", MigrationStep.NARROWED, 0.0))
    try:
        text = subprocess.run([*ADMIN, "status", "--federation", str(fed.spec.state_dir)],
                              capture_output=True, text=True, timeout=60).stdout
    finally:
        MigrationJournal(fed.spec.state_dir / "migrations.json").drop(waiting)
    assert "== cluster east ==" in text and "== cluster west ==" in text
    assert "1 migration(s) in flight" in text
    assert f"job {waiting}: east -> west, narrowed" in text


def test_the_placers_metrics_name_the_cluster_of_every_series(fed):
    from prometheus_client import generate_latest

    submit(fed, "west", "--clusters=west", "--gres=gpu:8", "-o", "/dev/null",
           "--wrap", "sleep 300")
    fed.wait_until(lambda: "RUNNING" in fed.run("west", "squeue", "--local", "-h", "-o",
                                                "%T").stdout, "the job to run")
    members = [Member(m, CliSlurmClient(fed.member(m).env()), fed.member(m).storage_root)
               for m in ("east", "west")]
    placer = FederationPlacer(members, fed.policy)
    placer.run_pass()
    text = generate_latest(placer.metrics.registry).decode()
    assert 'singularity_gpus_free{cluster="east"} 16.0' in text
    assert 'singularity_gpus_free{cluster="west"} 8.0' in text
    assert 'singularity_gpus_busy{cluster="west",tier="standard"} 8.0' in text
    assert 'singularity_account_gpus{account="default"} 8.0' in text
