"""The security tests' policy on the shared test cluster: the default
policy plus two accounts with members (sing-u1 in ``small``: basic only, a
gpu_quota of 2; sing-u2 in ``team2``) and ``research`` restricted to root
and the user who runs the tests. Installed with ``singularity-admin policy
apply`` (which also makes the associations and GrpTRES limits in slurmdbd)
for the module, and the default policy put back afterwards."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from security_helpers import security_policy_text
from slurm_singularity.policy import default_policy_path


def _apply(cluster, path: Path) -> None:
    r = cluster.run(sys.executable, "-m", "slurm_singularity.cli.admin", "policy", "apply",
                    str(path), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning" not in r.stderr, r.stderr


@pytest.fixture(scope="module")
def security_cluster(slurm_cluster, unprivileged_users, tmp_path_factory):
    path = tmp_path_factory.mktemp("security") / "policy.toml"
    path.write_text(security_policy_text())
    _apply(slurm_cluster, path)
    try:
        yield slurm_cluster
    finally:
        slurm_cluster.run("scancel", "--user=sing-u1")
        slurm_cluster.run("scancel", "--user=sing-u2")
        _apply(slurm_cluster, default_policy_path())
