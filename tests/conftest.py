"""Shared fixtures. ``slurm_cluster`` is a real local Slurm (munged,
slurmctld, 4 slurmd with 8 emulated GPUs each) on its own ports and state
directory, brought up once per test session and stopped by pid at the end,
so the tests never touch a cluster a person is using."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import users

from slurm_singularity import paths
from slurm_singularity.cluster import local
from slurm_singularity.cluster.api import ClusterSpec
from slurm_singularity.slurm.cli import CliSlurmClient

#: Ports of the test cluster; a person's demo cluster uses 16817/17001+.
TEST_CTLD_PORT = int(os.environ.get("SINGULARITY_TEST_CTLD_PORT", "26817"))
TEST_SLURMD_PORT = TEST_CTLD_PORT + 10184


@dataclass
class RunningCluster:
    spec: ClusterSpec
    client: CliSlurmClient

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **self.spec.env()}

    @property
    def conf_dir(self) -> Path:
        return self.spec.conf_dir

    def run(self, *cmd: str, check: bool = False, timeout: float = 60,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run a command (sbatch, scontrol, ...) against this cluster."""
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=check, cwd=cwd)

    def wait_job(self, job_id: int, timeout: float = 120) -> dict[str, str]:
        """Wait until the job reached a final state; returns scontrol's record."""
        deadline = time.monotonic() + timeout
        while True:
            rec = self.client.show_job(job_id)
            if rec.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                       "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
                return rec
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {rec.get('JobState')} after {timeout} s")
            time.sleep(0.5)


@pytest.fixture(scope="session")
def unprivileged_users() -> tuple[users.User, ...]:
    """Two real logins without privilege (tests/users.py), made once."""
    try:
        return users.ensure_users()
    except users.UsersUnavailable as exc:
        pytest.skip(f"security tests need real unprivileged users: {exc}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> RunningCluster:
    from slurm_singularity.policy.load import load_policy

    # Not under pytest's basetemp: a second pytest run on the machine prunes
    # old basetemps, which would pull the spool from under a running cluster.
    state_dir = Path(tempfile.mkdtemp(prefix="singularity-test-cluster-"))
    # mkdtemp makes it 0700; the unprivileged users of tests/security/ must
    # reach slurm.conf and munged's socket (the key and the database stay private)
    os.chmod(state_dir, 0o755)
    spec = ClusterSpec(state_dir=state_dir, nodes=4, gpus_per_node=8,
                       ctld_port=TEST_CTLD_PORT, slurmd_base_port=TEST_SLURMD_PORT,
                       cluster_name="singtest")
    local.up(spec, load_policy(paths.TEMPLATES_DIR / "policy.toml"))
    try:
        yield RunningCluster(spec, CliSlurmClient(spec.env()))
    finally:
        local.down(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
