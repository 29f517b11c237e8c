"""A real local federation (two clusters, east and west, 2 nodes x 8 GPUs
each, sharing one slurmdbd), brought up once per test session on its own
ports (``SINGULARITY_TEST_FED_PORT``, default 47017) and stopped by pid."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from slurm_singularity import paths
from slurm_singularity.cluster import federation
from slurm_singularity.cluster.api import ClusterSpec
from waiting import wait_until

FED_PORT = int(os.environ.get("SINGULARITY_TEST_FED_PORT", "47017"))
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@dataclass
class RunningFederation:
    spec: federation.FederationSpec
    policy: object

    def member(self, name: str) -> ClusterSpec:
        return self.spec.member(name)

    def env(self, name: str) -> dict[str, str]:
        return {**os.environ, **self.member(name).env()}

    def run(self, name: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a Slurm command against member ``name``."""
        return subprocess.run(list(cmd), env=self.env(name), capture_output=True, text=True,
                              timeout=60, check=check)

    def show(self, name: str, job_id: int) -> str:
        return self.run(name, "scontrol", "show", "job", str(job_id)).stdout

    def running_on(self, job_id: int) -> str | None:
        """The member whose own copy of the job runs, if any."""
        for m in self.spec.members:
            out = self.run(m.name, "squeue", "--local", "-h", "-j", str(job_id), "-o", "%T",
                           check=False).stdout.split()
            if "RUNNING" in out:
                return m.name
        return None

    def wait_until(self, predicate, what: str, timeout: float = 120):
        return wait_until(predicate, timeout, what, every=0.5)

    def cancel_all(self) -> None:
        for m in self.spec.members:
            self.run(m.name, "scancel", "--user=root", check=False)
        self.wait_until(lambda: all(not self.run(m.name, "squeue", "--local", "-h", "-t",
                                                 "RUNNING,PENDING", check=False).stdout.strip()
                                    for m in self.spec.members), "every job to end", 60)


@pytest.fixture(scope="session")
def local_federation() -> RunningFederation:
    from slurm_singularity.policy.load import load_policy

    state_dir = Path(tempfile.mkdtemp(prefix="singularity-test-fed-"))
    os.chmod(state_dir, 0o755)
    spec = federation.FederationSpec(
        name="testfed", state_dir=state_dir, members=federation.parse_members(
            "east:2x8,west:2x8"), base_port=FED_PORT)
    policy = load_policy(paths.TEMPLATES_DIR / "policy.toml")
    federation.up(spec, policy)
    try:
        yield RunningFederation(spec, policy)
    finally:
        federation.down(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture
def fed(local_federation) -> RunningFederation:
    """The session's federation, with no job left over from another test."""
    yield local_federation
    local_federation.cancel_all()
