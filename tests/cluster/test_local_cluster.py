"""The local cluster is a real Slurm: jobs get emulated GPUs and nodes, and
`singularity-admin cluster` starts and stops exactly its own daemons."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_singularity.cluster import local, wait
from slurm_singularity.cluster.api import ClusterError, ClusterSpec

pytestmark = pytest.mark.cluster

ADMIN = [sys.executable, "-m", "slurm_singularity.cli.admin"]


def admin(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([*ADMIN, *args], capture_output=True, text=True, timeout=timeout)


def test_sinfo_shows_four_idle_nodes_with_eight_gpus_each(slurm_cluster):
    out = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %t %G", check=True).stdout
    rows = sorted({tuple(line.split()) for line in out.splitlines()})
    assert rows == [(f"n{i}", "idle", "gpu:8") for i in range(1, 5)]


def test_a_job_asking_for_three_gpus_sees_three_devices(slurm_cluster, tmp_path):
    out = tmp_path / "gpus.out"
    r = slurm_cluster.run("sbatch", "--parsable", "--gres=gpu:3", "-o", str(out),
                          "--wrap", "echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES", check=True)
    rec = slurm_cluster.wait_job(int(r.stdout.strip().split(";")[0]))
    assert rec["JobState"] == "COMPLETED", rec
    line = out.read_text().strip()
    devices = line.split("=", 1)[1].split(",")
    assert len(devices) == 3 and len(set(devices)) == 3, line


def test_a_two_node_job_gets_two_nodes(slurm_cluster, tmp_path):
    out = tmp_path / "nodes.out"
    r = slurm_cluster.run("sbatch", "--parsable", "-N", "2", "-o", str(out),
                          "--wrap", "srun bash -c 'echo $SLURMD_NODENAME'", check=True)
    rec = slurm_cluster.wait_job(int(r.stdout.strip().split(";")[0]))
    assert rec["JobState"] == "COMPLETED", rec
    names = out.read_text().split()
    assert len(names) == 2 and len(set(names)) == 2, names


def test_cluster_up_twice_starts_no_duplicates(slurm_cluster):
    before = local.live_daemons(slurm_cluster.spec.state_dir)
    spec = slurm_cluster.spec
    r = admin("cluster", "up", "--state-dir", str(spec.state_dir), "--nodes", str(spec.nodes),
              "--gpus-per-node", str(spec.gpus_per_node), "--ctld-port", str(spec.ctld_port),
              "--slurmd-port", str(spec.slurmd_base_port), "--name", spec.cluster_name)
    assert r.returncode == 0, r.stderr
    assert "already up" in r.stderr
    assert local.live_daemons(spec.state_dir) == before


def test_cluster_up_with_another_shape_on_a_running_state_dir_is_refused(slurm_cluster):
    spec = slurm_cluster.spec
    r = admin("cluster", "up", "--state-dir", str(spec.state_dir), "--nodes", "2",
              "--ctld-port", str(spec.ctld_port), "--slurmd-port", str(spec.slurmd_base_port),
              "--name", spec.cluster_name)
    assert r.returncode != 0
    assert "cluster down" in r.stderr


def _free_port_block(n: int) -> int:
    """A base port with n+1 free ports after it (tests run in parallel with nothing else)."""
    for base in range(36000, 60000, 97):
        ok = True
        for p in range(base, base + n + 1):
            with socket.socket() as s:
                try:
                    s.bind(("0.0.0.0", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free ports")


def test_cluster_down_stops_every_daemon_it_started(tmp_path):
    base = _free_port_block(4) + 2   # mysql, dbd, ctld, slurmd n1, n2
    state = tmp_path / "small"
    r = admin("cluster", "up", "--state-dir", str(state), "--nodes", "2", "--gpus-per-node", "2",
              "--ctld-port", str(base), "--slurmd-port", str(base + 1), "--name", "small")
    try:
        assert r.returncode == 0, r.stderr
        assert "2 nodes (2 idle)" in r.stdout
        pids = local.live_daemons(state)
        assert sorted(pids) == ["mariadbd", "munged", "slurmctld", "slurmd-n1", "slurmd-n2",
                                "slurmdbd"]
    finally:
        d = admin("cluster", "down", "--state-dir", str(state))
    assert d.returncode == 0, d.stderr
    assert local.live_daemons(state) == {}
    for pid in pids.values():
        assert not _running(pid), f"pid {pid} still runs after cluster down"
    # status says so, with a non-zero exit
    st = admin("cluster", "status", "--state-dir", str(state))
    assert st.returncode == 3 and "not running" in st.stdout
    # and a second `up` on the same state directory works (no stale state)
    r2 = admin("cluster", "up", "--state-dir", str(state), "--nodes", "2", "--gpus-per-node", "2",
               "--ctld-port", str(base), "--slurmd-port", str(base + 1), "--name", "small")
    admin("cluster", "down", "--state-dir", str(state))
    assert r2.returncode == 0, r2.stderr


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_cluster_env_prints_an_export_line_for_slurm_conf(slurm_cluster):
    r = admin("cluster", "env", "--state-dir", str(slurm_cluster.spec.state_dir))
    assert r.returncode == 0
    assert r.stdout.strip() == f"export SLURM_CONF={slurm_cluster.spec.slurm_conf}"


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0"], "--nodes must be between 1 and 64"),
    (["--gpus-per-node", "-1"], "--gpus-per-node must be between 0 and 64"),
    (["--ctld-port", "80"], "--ctld-port must be between 1024 and 65535"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_options_are_refused_with_a_message_naming_them(tmp_path, args, message):
    state = tmp_path / "bad"
    r = admin("cluster", "up", "--state-dir", str(state), *args)
    assert r.returncode != 0
    assert message in r.stderr
    assert local.live_daemons(state) == {}


def test_a_state_directory_that_cannot_be_written_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = admin("cluster", "up", "--state-dir", str(blocker / "state"))
    assert r.returncode != 0
    assert "--state-dir" in r.stderr and "cannot be written" in r.stderr


def test_a_port_in_use_is_named_and_nothing_is_started(tmp_path):
    base = _free_port_block(3) + 2
    state = tmp_path / "busy"
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", base))
        s.listen()
        r = admin("cluster", "up", "--state-dir", str(state), "--nodes", "1",
                  "--ctld-port", str(base), "--slurmd-port", str(base + 1))
    assert r.returncode != 0
    assert f"port {base} (--ctld-port) is already in use" in r.stderr
    assert local.live_daemons(state) == {}
    assert not (state / "etc" / "slurm.conf").exists(), "config rendered although up failed"


class FakeClock:
    """time.monotonic and time.sleep of a wait, without waiting."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += dt


def test_a_start_up_wait_stretches_with_the_load_and_says_what_it_waits_for():
    assert wait.load_factor(loadavg=0.5, cpus=2) == 1.0
    assert wait.load_factor(loadavg=6.0, cpus=2) == 3.0
    assert wait.load_factor(loadavg=500.0, cpus=2) == wait.MAX_LOAD_FACTOR
    clock, notes = FakeClock(), []
    quiet = wait.Watched("slurmctld", lambda: True, lambda: 100, lambda: "error: cannot reach dbd")
    with pytest.raises(ClusterError) as err:
        wait.wait_for(lambda: False, 20, "slurmctld to answer on port 6817", watched=[quiet],
                      progress=notes.append, factor=wait.load_factor(6.0, 2), clock=clock,
                      sleep=clock.sleep)
    assert 60 <= clock.t < 61                  # 20 s x load 6 on 2 CPUs, not 20 s
    text = str(err.value)
    assert text.startswith("timed out after 60 s waiting for slurmctld to answer on port 6817 "
                           "(limit 20 s x load factor 3.0)"), text
    assert "slurmctld's log ends:\n  error: cannot reach dbd" in text
    assert len(notes) >= 10 and all(n.startswith("still waiting for slurmctld") for n in notes)
    clock.t = 0.0
    answered_at = 45.0
    assert wait.wait_for(lambda: clock.t >= answered_at, 20, "x", factor=3.0, clock=clock,
                         sleep=clock.sleep) == pytest.approx(answered_at, abs=0.3)


def test_a_daemon_whose_log_grows_gets_more_time_up_to_a_cap():
    clock, notes = FakeClock(), []
    busy = wait.Watched("slurmctld", lambda: True, lambda: int(clock.t * 10), lambda: "working")
    assert wait.wait_for(lambda: clock.t >= 70, 20, "slurmctld", watched=[busy], factor=1.0,
                         progress=notes.append, clock=clock, sleep=clock.sleep) >= 70
    assert any("still logging" in n for n in notes)
    clock.t = 0.0
    with pytest.raises(ClusterError, match="timed out after 160 s waiting for slurmctld"):
        wait.wait_for(lambda: False, 20, "slurmctld", watched=[busy], factor=1.0, clock=clock,
                      sleep=clock.sleep)


def test_a_daemon_that_dies_while_waited_for_is_reported_at_once_with_its_log(tmp_path):
    spec = ClusterSpec(state_dir=tmp_path)
    (tmp_path / "log").mkdir()
    record = local._start("slurmctld", ["sh", "-c", "echo 'fatal: Unable to bind listen port' "
                                        ">&2; sleep 0.3; exit 1"], spec)
    started = time.monotonic()
    with pytest.raises(ClusterError) as err:
        local._wait_for(lambda: False, 600, "slurmctld to answer", spec=spec,
                        daemons={"slurmctld": record})
    assert time.monotonic() - started < 10        # not after the 600 s limit
    text = str(err.value)
    assert text.startswith("slurmctld exited after ") and "while waiting for slurmctld" in text
    assert "fatal: Unable to bind listen port" in text
