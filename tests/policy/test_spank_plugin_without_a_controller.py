"""The SPANK plugin shows its options in sbatch/salloc/srun --help and
refuses typos in sbatch itself, before anything reaches a controller; its
messages are word for word those of rules.py. Needs only a slurm.conf and a
plugstack.conf, no daemons."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from submission_table import CASES
from slurm_singularity import paths
from slurm_singularity.policy import default_policy_path
from slurm_singularity.policy.load import load_policy
from slurm_singularity.policy.rules import decide

pytestmark = pytest.mark.skipif(
    not paths.SPANK_PLUGIN.exists() or shutil.which("sbatch") is None,
    reason="needs Slurm's commands and the built plugin (make -C spank)")

POLICY = load_policy(default_policy_path())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("conf")
    (d / "plugstack.conf").write_text(f"required {paths.SPANK_PLUGIN}\n")
    (d / "slurm.conf").write_text(
        "ClusterName=offline\nSlurmctldHost=localhost\nSlurmctldPort=1\n"
        f"PlugStackConfig={d / 'plugstack.conf'}\n"
        "NodeName=n1 CPUs=1 State=UNKNOWN\nPartitionName=p Nodes=n1 Default=YES\n")
    return {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}


def test_the_help_of_sbatch_salloc_and_srun_lists_the_options(env):
    for cmd in ("sbatch", "salloc", "srun"):
        out = subprocess.run([cmd, "--help"], env=env, capture_output=True, text=True,
                             timeout=30).stdout
        assert "Options provided by plugins:" in out, cmd
        tail = out.split("Options provided by plugins:", 1)[1]
        for opt in ("--sla=premium|standard|basic", "--elastic=MIN:MAX", "--world-size=N",
                    "--ckpt-dir=DIR", "--proxy=on|off", "--deterministic=on|off"):
            assert opt in tail, (cmd, opt)


@pytest.mark.parametrize("case", [c for c in CASES if c.by_plugin],
                         ids=[c.name for c in CASES if c.by_plugin])
def test_sbatch_refuses_a_typo_with_the_rules_message(env, case):
    r = subprocess.run(["sbatch", *case.argv, "--wrap", "true"], env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode != 0
    first = r.stderr.splitlines()[0]
    assert first == "sbatch: error: " + decide(POLICY, case.sub).message
