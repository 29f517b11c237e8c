"""On the real local Slurm, as an unprivileged user: a transparent job that
asks for more than one node is refused by sbatch itself, with the reason,
and no job is created; one on a single node is accepted and held to one
node; a user cannot grow a queued transparent job to several nodes."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.cluster

WHY = "transparent mode runs on one node only"


@pytest.fixture
def as_user(slurm_cluster, unprivileged_users):
    user = unprivileged_users[0]
    # the site admin's part: an association in the policy's default account
    slurm_cluster.run("sacctmgr", "-i", "add", "user", user.name, "account=default")

    def run(*cmd: str, cwd=None):
        # the account named: other tests of the session may have changed the
        # user's default account in slurmdbd
        return user.run(*cmd, env={**slurm_cluster.env, "SBATCH_ACCOUNT": "default"}, cwd=cwd)
    run.user = user
    return run


def _jobs_of(slurm_cluster, user) -> list[str]:
    out = slurm_cluster.run("squeue", "-h", "-u", user.name, "-o", "%i", check=True).stdout
    return out.split()


@pytest.mark.parametrize("nodes, says", [
    (("--nodes=2",), "--transparent with 2 nodes"),
    (("-N", "2-4"), "--transparent with 4 nodes"),
    (("-N2",), "--transparent with 2 nodes"),
])
def test_sbatch_refuses_a_transparent_job_on_several_nodes(slurm_cluster, as_user, nodes,
                                                           says):
    before = _jobs_of(slurm_cluster, as_user.user)
    r = as_user("sbatch", "--parsable", "--hold", "-o", "/dev/null", "--transparent", *nodes,
                "--wrap", "true")
    assert r.returncode != 0, f"sbatch accepted a transparent job on {nodes}: {r.stdout}"
    assert says in r.stderr and WHY in r.stderr and "--nodes=1" in r.stderr, r.stderr
    assert _jobs_of(slurm_cluster, as_user.user) == before, "a job was created"


def test_an_sbatch_line_asking_for_transparent_mode_counts_too(slurm_cluster, as_user):
    script = as_user.user.home / "transparent-two-nodes.sh"
    script.write_text("#!/bin/bash\n#SBATCH --transparent\n#SBATCH -o /dev/null\ntrue\n")
    script.chmod(0o755)
    r = as_user("sbatch", "--parsable", "--hold", "-N2", str(script))
    assert r.returncode != 0, r.stdout
    assert "--transparent with 2 nodes" in r.stderr and WHY in r.stderr, r.stderr


def test_a_single_node_transparent_job_is_held_to_one_node_and_cannot_grow(
        slurm_cluster, as_user):
    r = as_user("sbatch", "--parsable", "--hold", "-o", "/dev/null", "--transparent",
                "--wrap", "true")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    try:
        rec = slurm_cluster.client.show_job(int(job_id))
        assert rec["NumNodes"].split("-")[-1] == "1", rec["NumNodes"]
        grow = as_user("scontrol", "update", f"JobId={job_id}", "NumNodes=2")
        assert grow.returncode != 0, grow.stdout
        assert "Node count specification invalid" in grow.stderr, grow.stderr
        assert slurm_cluster.client.show_job(int(job_id))["NumNodes"].split("-")[-1] == "1"
    finally:
        slurm_cluster.run("scancel", job_id)
