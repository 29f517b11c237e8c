"""The devices' rendezvous is bounded and responsive: a rank that never
comes or an address that refuses fails the run within
``SINGULARITY_RENDEZVOUS_TIMEOUT_S`` with a message that names the address
and the setting, and asks for a requeue (75) instead of hanging for torch's
30 minutes; a preemption signal during the rendezvous ends it within about
a second. Real launchers on this machine play one node of a two-node job
(``SLURM_NNODES=2``) whose other node never starts."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from slurm_singularity import contract
from slurm_singularity.runtime import launcher
from slurm_singularity.runtime.api import RuntimeSetupError, StopReason
from slurm_singularity.runtime.history import read_history
from slurm_singularity.slurm.api import SlurmError

import runtime_harness as harness

TIMEOUT_S = 5


def _half_job(node: int, job_id: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": str(node), "SLURM_JOB_ID": str(job_id),
           "MASTER_ADDR": "127.0.0.1"}
    env.update(extra or {})
    return env


def _port(job_id: int) -> int:
    return 20000 + job_id % 20000


def _listening(port: int) -> bool:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True)
    return bool(out.stdout.strip())


@pytest.mark.parametrize("node", [0, 1], ids=["a rank that never comes",
                                             "an address that refuses"])
def test_a_rendezvous_that_cannot_succeed_asks_for_a_requeue_within_its_timeout(
        tmp_path, node):
    job_id = 17311 + node
    assert not _listening(_port(job_id)), "the test's port is taken"
    env = _half_job(node, job_id, {contract.RENDEZVOUS_TIMEOUT_S: str(TIMEOUT_S)})
    started = time.monotonic()
    done = harness.run(harness.LM, tmp_path, 1, 2, "--steps", "3", env=env, timeout=60)
    took = time.monotonic() - started
    assert done.returncode == contract.REQUEUE_EXIT_CODE, done.stderr[-3000:]
    assert took < TIMEOUT_S + 15, f"{took:.1f} s for a {TIMEOUT_S} s rendezvous timeout"
    assert f"127.0.0.1:{_port(job_id)}" in done.stderr
    assert contract.RENDEZVOUS_TIMEOUT_S in done.stderr and "requeue" in done.stderr
    if node == 0:      # device 0's node records the run
        (run,) = read_history(tmp_path)
        assert run.stop is StopReason.FAILED and run.exit_code == contract.REQUEUE_EXIT_CODE


def test_a_sigterm_during_the_rendezvous_ends_it_within_about_a_second(tmp_path):
    job_id = 17321
    proc = harness.launch(harness.LM, tmp_path, 1, 2, "--steps", "3",
                          env=_half_job(0, job_id))     # default timeout: 120 s
    deadline = time.monotonic() + 60
    while not _listening(_port(job_id)):               # device 0 waits for the other
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.1)
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == contract.REQUEUE_EXIT_CODE, err[-3000:]
    assert took < 2.5, f"{took:.2f} s from SIGTERM to exit"
    (run,) = read_history(tmp_path)
    assert run.stop is StopReason.PREEMPTED


@pytest.mark.parametrize("raw", ["0", "nan", "inf", "1e9", "-3", "soon"])
def test_a_bad_rendezvous_timeout_is_refused_at_start_naming_the_variable(tmp_path, raw):
    done = harness.run(harness.LM, tmp_path, 1, 1, "--steps", "1",
                       env={contract.RENDEZVOUS_TIMEOUT_S: raw}, timeout=60)
    assert done.returncode == 2, done.stderr[-3000:]
    assert contract.RENDEZVOUS_TIMEOUT_S in done.stderr and "Traceback" not in done.stderr


class _FakeSlurm:
    """Node names that do not resolve, reached at the NodeAddr Slurm has."""

    addresses = {"n3": "10.1.0.3", "n4": "10.1.0.4"}

    def hostnames(self, nodelist: str) -> list[str]:
        if nodelist != "n[3-4]":
            raise SlurmError(["scontrol"], 1, f"bad list {nodelist}")
        return ["n3", "n4"]

    def node_address(self, name: str) -> str:
        return self.addresses[name]


def test_device_0_is_reached_at_the_node_address_slurm_gives_not_its_name():
    env = {"SLURM_STEP_NODELIST": "n[3-4]", "SLURM_JOB_NODELIST": "n[1-4]"}
    assert launcher.device0_address(env, _FakeSlurm()) == "10.1.0.3"
    with pytest.raises(RuntimeSetupError, match="MASTER_ADDR"):
        launcher.device0_address({"SLURM_JOB_NODELIST": "n[7-8]"}, _FakeSlurm())
    with pytest.raises(RuntimeSetupError, match="SLURM_STEP_NODELIST"):
        launcher.device0_address({}, _FakeSlurm())


def test_resolve_uses_master_addr_when_set_and_slurm_otherwise(tmp_path, monkeypatch):
    script = tmp_path / "s.py"
    script.write_text("")
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_ID": "42",
           "SLURM_STEP_NODELIST": "n[3-4]"}
    monkeypatch.setattr(launcher, "device0_address", lambda environ: "10.1.0.3")
    spec = launcher.resolve(str(script), [], devices=2, world_size=4, ckpt_dir=str(tmp_path),
                            environ=env)
    assert (spec.master_addr, spec.master_port, spec.devices) == ("10.1.0.3", 20042, 4)
    spec = launcher.resolve(str(script), [], devices=2, world_size=4, ckpt_dir=str(tmp_path),
                            environ={**env, "MASTER_ADDR": "192.0.2.9"})
    assert spec.master_addr == "192.0.2.9"
