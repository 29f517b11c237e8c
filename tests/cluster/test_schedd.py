"""The scheduler-hook daemon on the real local Slurm (4 nodes x 8 GPUs):
an elastic basic job grows into idle GPUs, is shrunk (not preempted) when a
premium job arrives, grows back when it leaves; killing the daemon during a
resize or restarting slurmctld loses no job and repeats no action.

The jobs here are shell jobs that behave like the runtime at the signal
(checkpoint instantly, exit with the requeue code); the training runtime's
own end-to-end test checks the parameters through the same path."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_singularity import contract, paths
from slurm_singularity.cluster import local
from schedd_process import Schedd  # noqa: F401 - test_chaos imports it from here

pytestmark = pytest.mark.cluster

ELASTIC_JOB = """#!/bin/bash
echo "run restart=${{SLURM_RESTART_COUNT:-0}} nodes=$SLURM_JOB_NUM_NODES gpus_per_node=$(echo $CUDA_VISIBLE_DEVICES | tr ',' ' ' | wc -w)"
srun --ntasks-per-node=1 bash -c 'trap "sleep {ckpt_s}; exit {code}" TERM USR1; for i in $(seq 3000); do sleep 0.1; done'
"""


def apply_policy(cluster, policy: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "slurm_singularity.cli.admin", "policy", "apply",
                        str(policy)], env=cluster.env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def daemon_policy(tmp_path: Path, extra: str = "", quota: int = 32) -> Path:
    """The default policy with the daemon alone preempting and shrinking
    (``[elastic] preemption = "daemon"``), the accounts' ``gpu_quota`` set to
    ``quota``, plus ``extra`` TOML."""
    text = (paths.TEMPLATES_DIR / "policy.toml").read_text()
    assert 'preemption = "slurm"' in text and "gpu_quota = 32" in text
    text = text.replace('preemption = "slurm"', 'preemption = "daemon"')
    policy = tmp_path / "daemon-policy.toml"
    policy.write_text(text.replace("gpu_quota = 32", f"gpu_quota = {quota}") + extra)
    return policy


@contextlib.contextmanager
def running_schedd(cluster, tmp_path: Path, extra_policy: str = "", quota: int = 32,
                   basic_grace_s: int = 30, args: tuple[str, ...] = ()):
    """singularity-schedd in charge of a cluster whose Slurm preempts nothing
    by itself; the default policy is put back afterwards."""
    _cancel_all(cluster)
    policy = daemon_policy(tmp_path, extra_policy, quota)
    text = policy.read_text()
    policy.write_text(text.replace("grace_time_s = 30", f"grace_time_s = {basic_grace_s}", 1))
    apply_policy(cluster, policy)
    d = Schedd(cluster, tmp_path / "schedd.log", ("--policy", str(policy), *args))
    d.start()
    try:
        yield d
    finally:
        d.stop()
        _cancel_all(cluster)
        apply_policy(cluster, paths.TEMPLATES_DIR / "policy.toml")


@pytest.fixture
def schedd(slurm_cluster, tmp_path):
    with running_schedd(slurm_cluster, tmp_path) as d:
        yield d


def _cancel_all(cluster) -> None:
    cluster.run("scancel", "--user=root")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and cluster.run("squeue", "-h").stdout.strip():
        time.sleep(0.3)


def _submit_elastic(cluster, tmp_path: Path, ckpt_s: float = 0) -> tuple[int, Path]:
    """An elastic basic job W=32 on 8..32 GPUs whose 'checkpoint' at the
    signal takes ``ckpt_s`` seconds."""
    script = tmp_path / "elastic.sh"
    script.write_text(ELASTIC_JOB.format(ckpt_s=ckpt_s, code=contract.REQUEUE_EXIT_CODE))
    out = tmp_path / "elastic.out"
    r = cluster.run("sbatch", "--parsable", "--sla=basic", "--elastic=8:32", "--world-size=32",
                    "-N1", "--gres=gpu:8", "--open-mode=append", "-o", str(out), str(script),
                    check=True)
    return int(r.stdout.strip()), out


def _gpus(cluster, job_id: int) -> int:
    """GPUs the job holds while running (0 otherwise)."""
    rec = cluster.client.show_job(job_id)
    if rec.get("JobState") != "RUNNING":
        return 0
    per_node = int(rec.get("TresPerNode", "gres:gpu:0").rsplit(":", 1)[-1])
    return per_node * int(rec.get("NumNodes", "1").split("-")[0])


def _wait_gpus(cluster, job_id: int, gpus: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gpus(cluster, job_id) == gpus:
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not reach {gpus} GPUs; has {_gpus(cluster, job_id)}: "
                         f"{cluster.client.show_job(job_id)}")


def _runs(out: Path) -> list[str]:
    return [l for l in out.read_text().splitlines() if l.startswith("run ")]


def _sizes(out: Path) -> list[int]:
    """GPUs of each run of the job, from its output."""
    sizes = []
    for line in _runs(out):
        f = dict(kv.split("=") for kv in line.split()[1:])
        sizes.append(int(f["nodes"]) * int(f["gpus_per_node"]))
    return sizes


def test_elastic_job_grows_is_shrunk_for_premium_and_grows_back(slurm_cluster, schedd, tmp_path):
    job, out = _submit_elastic(slurm_cluster, tmp_path)
    _wait_gpus(slurm_cluster, job, 32)

    r = slurm_cluster.run("sbatch", "--parsable", "--sla=premium", "--account=research", "-N2",
                          "--gres=gpu:8", "-o", "/dev/null", "--wrap", "sleep 12", check=True)
    premium = int(r.stdout.strip())
    _wait_gpus(slurm_cluster, job, 16)
    assert slurm_cluster.client.show_job(premium)["JobState"] == "RUNNING"
    slurm_cluster.wait_job(premium, timeout=60)
    _wait_gpus(slurm_cluster, job, 32)
    deadline = time.monotonic() + 15      # its script prints a moment after Slurm starts it
    while _sizes(out)[-1:] != [32] and time.monotonic() < deadline:
        time.sleep(0.2)

    sizes = _sizes(out)
    # one run per size: the daemon sets the pending job to 32 before Slurm
    # starts it (or grows it from 8 if Slurm was quicker), then 16, then 32
    assert sizes in ([32, 16, 32], [8, 32, 16, 32]), sizes
    log = schedd.text()
    assert f"[job {job}] shrink 32 -> 16" in log and f"job {premium} (premium)" in log
    assert f"[job {job}] preempt" not in log


INPLACE_JOB = """#!/bin/bash
echo "run restart=${{SLURM_RESTART_COUNT:-0}}"
{bin}/singularity-job srun --ntasks-per-node=1 bash -c \\
    'echo "step nodes=$SLURM_JOB_NUM_NODES"; trap "exit {code}" TERM; for i in $(seq 3000); do sleep 0.1; done'
"""


def test_a_job_under_singularity_job_is_shrunk_in_place_without_a_requeue(
        slurm_cluster, schedd, tmp_path):
    script = tmp_path / "inplace.sh"
    script.write_text(INPLACE_JOB.format(bin=Path(sys.executable).parent,
                                         code=contract.REQUEUE_EXIT_CODE))
    out = tmp_path / "inplace.out"
    job = int(slurm_cluster.run("sbatch", "--parsable", "--sla=basic", "--elastic=8:32",
                                "--world-size=32", "-N1", "--gres=gpu:8", "--open-mode=append",
                                "-o", str(out), str(script), check=True).stdout.strip())
    _wait_gpus(slurm_cluster, job, 32)       # a grow: by requeue (Slurm cannot grow in place)
    runs_before = out.read_text().count("run restart=")

    premium = int(slurm_cluster.run("sbatch", "--parsable", "--sla=premium", "--account=research",
                                    "-N2", "--gres=gpu:8", "-o", "/dev/null", "--wrap",
                                    "sleep 30", check=True).stdout.strip())
    _wait_gpus(slurm_cluster, job, 16)
    deadline = time.monotonic() + 30
    while slurm_cluster.client.show_job(premium)["JobState"] != "RUNNING":
        assert time.monotonic() < deadline, slurm_cluster.client.show_job(premium)
        time.sleep(0.2)
    # the new step prints its lines a moment after the premium job starts
    deadline = time.monotonic() + 30
    while True:
        text = out.read_text()
        # each task of a step prints its line: one line per node
        steps = [int(n) for n in re.findall(r"^step nodes=(\d+)", text, flags=re.M)]
        if steps[-6:] == [4, 4, 4, 4, 2, 2] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert text.count("run restart=") == runs_before, "the shrink requeued the job"
    assert "shrunk in place to 2 node(s)" in text, text
    assert steps[-6:] == [4, 4, 4, 4, 2, 2], steps
    deadline = time.monotonic() + 15         # the daemon's next pass clears its mark
    while "shrunk in place to 16 GPUs by the job itself" not in schedd.text():
        assert time.monotonic() < deadline, schedd.text()[-3000:]
        time.sleep(0.2)
    assert f"[job {job}] shrink 32 -> 16" in schedd.text()
    assert slurm_cluster.client.show_job(job)["JobState"] == "RUNNING"
    assert ",resize=" not in slurm_cluster.client.show_job(job)["AdminComment"]


def test_killing_the_daemon_during_a_resize_repeats_nothing(slurm_cluster, schedd, tmp_path):
    job, out = _submit_elastic(slurm_cluster, tmp_path, ckpt_s=4)
    _wait_gpus(slurm_cluster, job, 32)
    restarts = int(slurm_cluster.client.show_job(job)["Restarts"])
    slurm_cluster.run("sbatch", "--sla=premium", "--account=research", "-N2", "--gres=gpu:8",
                      "-o", "/dev/null", "--wrap", "sleep 90", check=True)
    # kill the daemon as soon as it has marked the shrink, before the job is back
    deadline = time.monotonic() + 60
    while ",resize=" not in slurm_cluster.client.show_job(job).get("AdminComment", ""):
        assert time.monotonic() < deadline, "the daemon never started a resize"
        time.sleep(0.05)
    schedd.kill()
    time.sleep(2)
    schedd.start()
    _wait_gpus(slurm_cluster, job, 16)
    time.sleep(3)   # a few more passes: nothing more may happen
    assert _sizes(out)[-2:] == [32, 16], _sizes(out)
    # exactly one requeue for the one shrink
    assert int(slurm_cluster.client.show_job(job)["Restarts"]) == restarts + 1
    assert _gpus(slurm_cluster, job) == 16
    assert ",resize=" not in slurm_cluster.client.show_job(job).get("AdminComment", "")


def test_a_slurmctld_restart_during_a_resize_loses_no_job(slurm_cluster, schedd, tmp_path):
    job, out = _submit_elastic(slurm_cluster, tmp_path, ckpt_s=4)
    _wait_gpus(slurm_cluster, job, 32)
    restarts = int(slurm_cluster.client.show_job(job)["Restarts"])
    r = slurm_cluster.run("sbatch", "--parsable", "--sla=premium", "--account=research", "-N2",
                          "--gres=gpu:8", "-o", "/dev/null", "--wrap", "sleep 90", check=True)
    premium = int(r.stdout.strip())
    deadline = time.monotonic() + 60
    while ",resize=" not in slurm_cluster.client.show_job(job).get("AdminComment", ""):
        assert time.monotonic() < deadline, "the daemon never started a resize"
        time.sleep(0.05)
    local.restart(slurm_cluster.spec.state_dir, "slurmctld")
    _wait_gpus(slurm_cluster, job, 16)
    time.sleep(3)
    assert slurm_cluster.client.show_job(premium)["JobState"] == "RUNNING"
    assert int(slurm_cluster.client.show_job(job)["Restarts"]) == restarts + 1
    assert _sizes(out)[-2:] == [32, 16], _sizes(out)
    assert "Traceback" not in schedd.text()
    assert schedd.proc.poll() is None, "the daemon died when slurmctld restarted"


def test_the_metrics_count_gpus_per_tier_and_the_actions(slurm_cluster, tmp_path):
    from prometheus_client import generate_latest

    from slurm_singularity.policy.load import load_policy
    from slurm_singularity.sched.daemon import Daemon, DaemonSettings
    from slurm_singularity.slurm.cli import CliSlurmClient

    _cancel_all(slurm_cluster)
    job, _ = _submit_elastic(slurm_cluster, tmp_path)
    daemon = Daemon(CliSlurmClient(slurm_cluster.spec.env()),
                    load_policy(paths.TEMPLATES_DIR / "policy.toml"), DaemonSettings())
    try:
        # the daemon's first pass sets the pending job's request to 32 (a
        # start), or, if Slurm started it at 8 a moment earlier, grows it
        # (a resize, finished over the next passes)
        done = []
        deadline = time.monotonic() + 90
        while _gpus(slurm_cluster, job) != 32:
            assert time.monotonic() < deadline, (done, slurm_cluster.client.show_job(job))
            done += [(a.kind.value, a.devices_to) for a, _ in daemon.run_pass()]
            time.sleep(0.5)
        assert done in ([("start", 32)], [("grow", 32)]), done
        daemon.run_pass()
        text = generate_latest(daemon.metrics.registry).decode()
        assert 'singularity_gpus_busy{tier="basic"} 32.0' in text
        assert f'singularity_actions_total{{kind="{done[0][0]}"}} 1.0' in text
        assert 'singularity_jobs{phase="running",tier="basic"} 1.0' in text
    finally:
        _cancel_all(slurm_cluster)


STUBBORN_JOB = """#!/bin/bash
echo "run restart=${SLURM_RESTART_COUNT:-0} gpus=$(echo $CUDA_VISIBLE_DEVICES | tr ',' ' ' | wc -w)"
srun --ntasks-per-node=1 bash -c 'trap "" TERM USR1; for i in $(seq 3000); do sleep 0.1; done'
"""


def test_a_job_that_ignores_the_signal_is_requeued_after_its_grace_time_not_signalled_again(
        slurm_cluster, tmp_path):
    """Issue 19, item 5: a job that ignores SIGTERM blocked a premium job
    forever, signalled again every pass. Basic's grace time is 5 s here."""
    with running_schedd(slurm_cluster, tmp_path, basic_grace_s=5,
                        args=("--min-grace", "5")) as schedd:
        script = tmp_path / "stubborn.sh"
        script.write_text(STUBBORN_JOB)
        out = tmp_path / "stubborn.out"
        job = int(slurm_cluster.run(
            "sbatch", "--parsable", "--sla=basic", "--elastic=8:32", "--world-size=32", "-N1",
            "--gres=gpu:8", "--open-mode=append", "-o", str(out), str(script),
            check=True).stdout.strip())
        _wait_gpus(slurm_cluster, job, 32)
        premium = int(slurm_cluster.run(
            "sbatch", "--parsable", "--sla=premium", "--account=research", "-N2",
            "--gres=gpu:8", "-o", "/dev/null", "--wrap", "sleep 60", check=True).stdout.strip())
        deadline = time.monotonic() + 60
        while slurm_cluster.client.show_job(premium)["JobState"] != "RUNNING":
            assert time.monotonic() < deadline, schedd.text()[-3000:]
            time.sleep(0.5)
        _wait_gpus(slurm_cluster, job, 16)
        time.sleep(3)                                    # a few more passes
        log = schedd.text()
    # the shrink for the premium job (the grow to 32 before it went the same way)
    signals = re.findall(rf"\[job {job}\] resize to 16: .*sent SIGTERM", log)
    assert len(signals) == 1, log[-3000:]
    requeues = re.findall(
        rf"\[job {job}\] resize to 16: still running 5 s after SIGTERM.*requeued it", log)
    assert len(requeues) == 1, log[-3000:]
    assert "signalled again" not in log and "killed it" not in log, log[-3000:]


def test_a_begin_time_and_a_held_job_are_left_alone(slurm_cluster, schedd, tmp_path):
    """Issue 19, item 6: the daemon started a ``--begin=now+3600`` job at
    once, and shrank a job for a held one."""
    job, _ = _submit_elastic(slurm_cluster, tmp_path)
    _wait_gpus(slurm_cluster, job, 32)
    later = int(slurm_cluster.run(
        "sbatch", "--parsable", "--sla=premium", "--account=research", "-N2", "--gres=gpu:8",
        "--begin=now+3600", "-o", "/dev/null", "--wrap", "true", check=True).stdout.strip())
    held = int(slurm_cluster.run(
        "sbatch", "--parsable", "--sla=premium", "--account=research", "-N2", "--gres=gpu:8",
        "--hold", "-o", "/dev/null", "--wrap", "true", check=True).stdout.strip())
    time.sleep(6)                                        # a dozen passes
    begin = slurm_cluster.client.show_job(later)
    assert begin["JobState"] == "PENDING" and begin["Reason"] == "BeginTime", begin
    assert slurm_cluster.client.show_job(held)["JobState"] == "PENDING"
    assert _gpus(slurm_cluster, job) == 32
    log = schedd.text()
    assert f"[job {job}] shrink" not in log and f"[job {later}]" not in log, log[-3000:]
