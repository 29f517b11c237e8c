"""The SPANK plugin starts a step's device proxies (--proxy=on), on the real
local cluster: one proxy per GPU of the step, running before the tasks and
as the job's user, their addresses in the tasks' environment, stopped and
their directory deleted when the step ends; training through them gives the
parameters of a run without proxies; a proxy that cannot start, or a step
without a GPU, fails the step with a message that says why and no task
runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_singularity import paths

pytestmark = pytest.mark.cluster

BIN = Path(sys.executable).parent
TRAIN = paths.REPO_ROOT / "examples" / "train_lm.py"
FINAL = re.compile(r"final step=(\d+) params_sha256=([0-9a-f]{64})")

# What a task reports about the proxies it was given: for each address, the
# pid in the proxy's pid file, that process's uid, and whether it started
# before this task did (its /proc start time, in clock ticks since boot).
PROBE = r"""
import os
addrs = os.environ["SINGULARITY_PROXY_ADDRS"].split(",")
print("state", os.environ["SINGULARITY_PROXY_STATE"])
print("job", os.environ["SINGULARITY_PROXY_JOB"])
def started(pid):
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19])
for a in addrs:
    pid = int(open(a + ".pid").read().split()[0])
    uid = os.stat(f"/proc/{pid}").st_uid
    cmd = open(f"/proc/{pid}/cmdline").read().split("\0")
    print("proxy", pid, uid, a in cmd, os.path.exists(a), started(pid) <= started(os.getpid()))
"""


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def test_a_step_gets_one_proxy_per_gpu_before_its_tasks_and_loses_them_after(slurm_cluster):
    r = slurm_cluster.run("srun", "--proxy=on", "-N1", "--gres=gpu:3", str(sys.executable),
                          "-c", PROBE, timeout=120)
    assert r.returncode == 0, r.stderr
    proxies = [line.split()[1:] for line in r.stdout.splitlines() if line.startswith("proxy")]
    assert len(proxies) == 3, r.stdout
    for pid, uid, named, socket_there, before_task in proxies:
        assert uid == str(os.getuid()), "a proxy must run as the job's user"
        assert named == "True" and socket_there == "True" and before_task == "True", r.stdout
    job = re.search(r"^job (\S+)", r.stdout, re.M).group(1)
    assert re.fullmatch(r"\d+\.0", job), job
    state = Path(re.search(r"^state (\S+)", r.stdout, re.M).group(1))
    # slurmstepd stops them after the tasks ended (srun may return first)
    _wait(lambda: all(_gone(int(p[0])) for p in proxies), 30, "the step's proxies to stop")
    _wait(lambda: not state.exists(), 10, f"{state} to be deleted")


def test_training_through_the_steps_proxies_ends_as_without_them(slurm_cluster, tmp_path):
    ref = subprocess.run([str(BIN / "singularity-run"), "--devices", "2", "--world-size", "8",
                          "--proxy", "off", "--ckpt-dir", str(tmp_path / "ref"), str(TRAIN),
                          "--steps", "6", "--ckpt-every", "1000"],
                         capture_output=True, text=True, timeout=300)
    want = FINAL.search(ref.stdout)
    assert want, ref.stdout + ref.stderr
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH -N1 --gres=gpu:2 --world-size=8 --proxy=on
srun --ntasks-per-node=1 {BIN / 'singularity-run'} {TRAIN} --steps 6 --ckpt-every 1000
""")
    out = tmp_path / "out.txt"
    r = slurm_cluster.run("sbatch", "--parsable", f"--ckpt-dir={tmp_path / 'ckpt'}",
                          "-o", str(out), str(script), check=True)
    rec = slurm_cluster.wait_job(int(r.stdout.strip()), timeout=300)
    text = out.read_text()
    assert rec["JobState"] == "COMPLETED", text[-2000:]
    assert "using the step's 2 device proxies (started by the SPANK plugin)" in text, text
    got = FINAL.search(text)
    assert got and got.groups() == want.groups(), text[-2000:]


def test_a_proxy_that_cannot_start_fails_the_step_with_its_reason(slurm_cluster):
    env_cmd = ["env", "SINGULARITY_PROXY_RING_BYTES=3000"]    # not a power of two
    r = subprocess.run([*env_cmd, "srun", "--proxy=on", "-N1", "--gres=gpu:1", "echo",
                        "task ran"], env=slurm_cluster.env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    assert "task ran" not in r.stdout
    assert ("a device proxy failed to start: SINGULARITY_PROXY_RING_BYTES: ring_bytes=3000"
            in r.stderr), r.stderr
    assert "not starting the task: the step's device proxies did not start" in r.stderr


def test_proxy_on_in_a_step_without_a_gpu_fails_it_and_says_to_ask_for_one(slurm_cluster):
    r = slurm_cluster.run("srun", "--proxy=on", "-N1", "echo", "task ran", timeout=120)
    assert r.returncode != 0
    assert "task ran" not in r.stdout
    assert "has no GPU on this node (ask for one with --gres=gpu:N)" in r.stderr, r.stderr


def test_proxy_off_starts_no_proxy(slurm_cluster):
    r = slurm_cluster.run("srun", "-N1", "--gres=gpu:1", "env", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "SINGULARITY_PROXY_ADDRS" not in r.stdout
