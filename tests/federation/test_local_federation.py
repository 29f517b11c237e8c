"""`singularity-admin cluster up --federation` brings up a real Slurm
federation of local clusters sharing one slurmdbd: a job submitted to a full
member runs on another, `cluster env --cluster` points at any member, and
`cluster down` leaves no process behind. Bad specs are refused by name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

ADMIN = [sys.executable, "-m", "slurm_singularity.cli.admin"]
#: This file's own federation; the session fixture's uses FED_PORT.
CLI_FED_PORT = int(os.environ.get("SINGULARITY_TEST_FED_PORT", "47017")) + 500


def admin(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*ADMIN, *args], capture_output=True, text=True, timeout=timeout)


def member_env(state_dir: Path, name: str) -> dict[str, str]:
    r = admin("cluster", "env", "--state-dir", str(state_dir), "--cluster", name)
    assert r.returncode == 0, r.stderr
    key, _, value = r.stdout.strip().removeprefix("export ").partition("=")
    return {**os.environ, key: value.strip("'")}


def processes_under(state_dir: Path) -> list[str]:
    """Command lines of live processes that name the state directory."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(state_dir) in cmd and "pytest" not in cmd:
            found.append(f"{pid}: {cmd}")
    return found


@pytest.mark.parametrize("args, field", [
    (["--federation", "fed"], "--federation needs --clusters"),
    (["--clusters", "east:1x8,west:1x8"], "--clusters needs --federation"),
    (["--federation", "fed", "--clusters", "east:1x8"], "--clusters"),
    (["--federation", "fed", "--clusters", "east:1,west:1x8"], "--clusters member 1"),
    (["--federation", "fed", "--clusters", "east:1x8,east:2x8"], "--clusters names east"),
    (["--federation", "fed", "--clusters", "east:1x8,west:99x8"], "--clusters member 'west'"),
    (["--federation", "Fed", "--clusters", "east:1x8,west:1x8"], "--federation"),
    (["--federation", "fed", "--clusters", "east:1x8,west:1x8", "--ctld-port", "65500"],
     "--ctld-port"),
])
def test_a_bad_federation_spec_is_refused_naming_the_field(args, field, tmp_path):
    r = admin("cluster", "up", "--state-dir", str(tmp_path / "fed"), *args, timeout=60)
    assert r.returncode == 1
    assert f"error: {field}" in r.stderr, r.stderr
    assert processes_under(tmp_path) == []


def test_a_job_submitted_to_a_full_member_runs_on_the_other_and_down_stops_all():
    state_dir = Path(tempfile.mkdtemp(prefix="singularity-test-fed-cli-"))
    os.chmod(state_dir, 0o755)
    daemons: dict[str, int] = {}
    try:
        for port in (CLI_FED_PORT, CLI_FED_PORT + 250):
            # these ports lie in Linux's ephemeral range: a client socket of
            # another cluster may hold one for a moment; then try others
            r = admin("cluster", "up", "--state-dir", str(state_dir), "--federation", "demo",
                      "--clusters", "east:1x2,west:1x2", "--ctld-port", str(port))
            if "is already in use" not in r.stderr:
                break
        assert r.returncode == 0, r.stderr[-3000:]
        assert "east: 1 nodes (1 idle)" in r.stdout and "west: 1 nodes (1 idle)" in r.stdout
        east, west = member_env(state_dir, "east"), member_env(state_dir, "west")
        # east and west each see the other as a synced sibling
        for env, other in ((east, "west"), (west, "east")):
            fed = subprocess.run(["scontrol", "show", "federation"], env=env,
                                 capture_output=True, text=True, check=True).stdout
            assert "Federation: demo" in fed
            assert any(line.strip().startswith("Sibling:") and other in line and
                       "Synced:Yes" in line for line in fed.splitlines()), fed

        # fill east with a job that may run on east only
        subprocess.run(["sbatch", "--clusters=east", "--gres=gpu:2", "-o", "/dev/null",
                        "--wrap", "sleep 300"], env=east, check=True, capture_output=True)
        out = state_dir / "where.out"
        r = subprocess.run(["sbatch", "--parsable", "--gres=gpu:2", "-o", str(out),
                            "--wrap", "echo $SLURM_CLUSTER_NAME"],
                           env=east, check=True, capture_output=True, text=True)
        job_id = int(r.stdout.strip().split(";")[0])
        assert job_id >= 67108865       # the federation's job ids
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_text().strip()):
            assert time.monotonic() < deadline, "the federated job never ran"
            time.sleep(1)
        assert out.read_text().strip() == "west"

        for name in ("east", "west"):
            records = json.loads((state_dir / name / "run" / "daemons.json").read_text())
            daemons.update({f"{name}/{d}": rec["pid"] for d, rec in records.items()})
        assert "east/slurmdbd" in daemons and "west/slurmctld" in daemons
        assert not any(k.startswith("west/") and k.endswith(("slurmdbd", "munged"))
                       for k in daemons)        # west shares east's
    finally:
        r = admin("cluster", "down", "--state-dir", str(state_dir))
    assert r.returncode == 0, r.stderr
    assert processes_under(state_dir) == []
    for name, pid in daemons.items():
        assert not Path(f"/proc/{pid}").exists() or \
            str(state_dir) not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"), name
    shutil.rmtree(state_dir, ignore_errors=True)
