"""On the real local Slurm: the SPANK plugin and the generated job_submit.lua
refuse bad submissions in sbatch with a message naming the problem, give
valid ones the partition, requeue and AdminComment the policy says, put the
SINGULARITY_* variables into the job, and `policy apply` of a bad file
changes nothing."""

from __future__ import annotations

import hashlib
import sys

import pytest

from submission_table import CASES
from slurm_singularity import contract
from slurm_singularity.policy import default_policy_path
from slurm_singularity.policy.load import load_policy
from slurm_singularity.policy.rules import Decision, decide

pytestmark = pytest.mark.cluster

POLICY = load_policy(default_policy_path())


def _sbatch(cluster, *argv: str):
    return cluster.run("sbatch", "--parsable", "--hold", "-o", "/dev/null", *argv,
                       "--wrap", "true")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_sbatch_does_what_the_rules_say(slurm_cluster, case):
    r = _sbatch(slurm_cluster, *case.argv)
    if case.partition is None:
        assert r.returncode != 0, f"sbatch accepted {case.argv}: {r.stdout}"
        assert case.expect in r.stderr, r.stderr
        assert decide(POLICY, case.sub).message in r.stderr    # word for word
        return
    assert r.returncode == 0, r.stderr
    job_id = int(r.stdout.strip().split(";")[0])
    try:
        rec = slurm_cluster.client.show_job(job_id)
        decision = decide(POLICY, case.sub)
        assert isinstance(decision, Decision)
        assert rec["Partition"] == case.partition
        assert rec["Requeue"] == "1"
        assert rec["AdminComment"].strip() == case.expect
        assert contract.parse_job_tag(rec["AdminComment"]).world_size == decision.world_size
    finally:
        slurm_cluster.run("scancel", str(job_id))


def test_the_job_sees_the_singularity_variables(slurm_cluster, tmp_path):
    out = tmp_path / "env.out"
    r = slurm_cluster.run(
        "sbatch", "--parsable", "--sla=basic", "--elastic=2:8", "--world-size=8",
        "--gres=gpu:4", "--ckpt-dir=/tmp/ck", "-o", str(out),
        "--wrap", "env | grep ^SINGULARITY_ | sort; srun env | grep ^SINGULARITY_SLA=",
        check=False)
    assert r.returncode == 0, r.stderr
    rec = slurm_cluster.wait_job(int(r.stdout.strip().split(";")[0]))
    assert rec["JobState"] == "COMPLETED", rec
    lines = out.read_text().split()
    assert "SINGULARITY_SLA=basic" in lines
    assert "SINGULARITY_ELASTIC=2:8" in lines
    assert "SINGULARITY_WORLD_SIZE=8" in lines
    assert "SINGULARITY_CKPT_DIR=/tmp/ck" in lines, lines
    assert "SINGULARITY_PREEMPT_SIGNAL=TERM" in lines
    assert "SINGULARITY_PROXY=off" in lines
    assert lines.count("SINGULARITY_SLA=basic") == 2     # the batch step and the srun step


def test_the_plugin_sets_the_variables_of_an_srun_job_in_its_step(slurm_cluster):
    # job_submit.lua cannot set an interactive job's environment: these come
    # from the SPANK plugin's remote context alone.
    r = slurm_cluster.run("srun", "--sla=basic", "--elastic=1:2", "--world-size=2",
                          "--gres=gpu:1", "--proxy=on", "--deterministic=off", "bash", "-c",
                          "env | grep ^SINGULARITY_ | sort", timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    for var in ("SINGULARITY_SLA=basic", "SINGULARITY_ELASTIC=1:2", "SINGULARITY_WORLD_SIZE=2",
                "SINGULARITY_PROXY=on", "SINGULARITY_DETERMINISTIC=off"):
        assert var in lines, (var, lines)
    bad = slurm_cluster.run("srun", "--world-size=3", "--gres=gpu:2", "true", timeout=60)
    assert bad.returncode != 0
    assert "singularity: --world-size=3: must be a multiple of 2" in bad.stderr


def test_an_sbatch_line_is_checked_like_the_command_line(slurm_cluster, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\n#SBATCH --elastic=8:2\ntrue\n")
    r = slurm_cluster.run("sbatch", str(script))
    assert r.returncode != 0
    assert "singularity: --elastic=8:2: MIN must not exceed MAX" in r.stderr


def test_the_options_are_listed_by_sbatch_salloc_and_srun_help(slurm_cluster):
    for cmd in ("sbatch", "salloc", "srun"):
        out = slurm_cluster.run(cmd, "--help").stdout
        tail = out.split("Options provided by plugins:", 1)[1]
        for opt in ("--sla=", "--elastic=MIN:MAX", "--world-size=N", "--ckpt-dir=DIR",
                    "--proxy=on|off", "--deterministic=on|off"):
            assert opt in tail, (cmd, opt)


def _digest(conf_dir) -> dict[str, str]:
    return {name: hashlib.sha256((conf_dir / name).read_bytes()).hexdigest()
            for name in ("policy.conf", "job_submit.lua", "slurm.conf")}


def test_policy_apply_of_a_bad_file_leaves_the_cluster_untouched(slurm_cluster, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(default_policy_path().read_text().replace("grace_time_s = 30",
                                                             "grace_time_s = -1"))
    before_files = _digest(slurm_cluster.conf_dir)
    before_parts = slurm_cluster.run("scontrol", "show", "partition", "-o", check=True).stdout
    r = slurm_cluster.run(sys.executable, "-m", "slurm_singularity.cli.admin", "policy",
                          "apply", str(bad), "--conf-dir", str(slurm_cluster.conf_dir))
    assert r.returncode != 0
    assert f"{bad}:" in r.stderr and "tiers.basic.grace_time_s" in r.stderr
    assert _digest(slurm_cluster.conf_dir) == before_files
    after_parts = slurm_cluster.run("scontrol", "show", "partition", "-o", check=True).stdout
    assert after_parts == before_parts


def test_policy_apply_of_the_default_installs_it_and_reconfigures(slurm_cluster):
    r = slurm_cluster.run(sys.executable, "-m", "slurm_singularity.cli.admin", "policy",
                          "apply", str(default_policy_path()), "--conf-dir",
                          str(slurm_cluster.conf_dir), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "reconfigure: done" in r.stdout
    text = (slurm_cluster.conf_dir / "job_submit.lua").read_text()
    assert str(default_policy_path()) in text
    parts = slurm_cluster.run("scontrol", "show", "partition", "basic", "-o", check=True).stdout
    assert "PreemptMode=REQUEUE" in parts and "GraceTime=30" in parts


def test_a_user_cannot_change_the_partition_of_a_job(slurm_cluster, unprivileged_users):
    """job_submit.lua's slurm_job_modify refuses a partition change by a
    non-root user (it would change the tier behind the policy's back)."""
    user = unprivileged_users[1]
    # the site admin's part: an association in the policy's default account
    # (AccountingStorageEnforce=associations refuses users without one)
    slurm_cluster.run("sacctmgr", "-i", "add", "user", user.name, "account=default")

    def as_user(*cmd: str):
        return user.run(*cmd, env=slurm_cluster.env)

    r = as_user("sbatch", "--parsable", "--hold", "-o", "/dev/null", "--account=default",
                "--sla=basic", "--wrap", "true")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    try:
        # scontrol of 22.05 does not print job_modify's user message.
        upd = as_user("scontrol", "update", f"JobId={job_id}", "Partition=standard")
        assert upd.returncode != 0, upd.stdout
        other = as_user("scontrol", "update", f"JobId={job_id}", "Comment=mine")
        assert other.returncode == 0, other.stderr
        rec = slurm_cluster.client.show_job(int(job_id))
        assert rec["Partition"] == "basic"
        assert rec["Comment"].strip() == "mine"
    finally:
        slurm_cluster.run("scancel", job_id)
