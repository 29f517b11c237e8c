"""A worker killed with SIGKILL at random steps, three times in one run,
re-attaches to its proxy by job name and finishes with the parameters of an
uninterrupted run, without any checkpoint file."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from slurm_singularity.proxy import reference as R

STEPS = 10
WORKER = Path(__file__).with_name("kill_worker.py")


def _uninterrupted_sha() -> str:
    cfg = R.LMConfig()
    model, opt = R.make(cfg)
    torch.manual_seed(1)
    for s in range(STEPS):
        x, y = R.batch(cfg, s)
        R.train_step(model, opt, x, y)
        opt.step()
        opt.zero_grad()
    return R.param_sha256(model)


def _launch(proxy, job: str, ckpt: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), proxy.addr, job, str(STEPS), str(ckpt)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_worker_killed_three_times_finishes_with_the_uninterrupted_parameters(proxy, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    rng = random.Random(os.getpid())
    kills = sorted(rng.sample(range(1, STEPS - 3), 3))
    starts = []
    for k in kills:
        proc = _launch(proxy, "killed-job", ckpt)
        seen = []
        target = k
        for line in proc.stdout:
            seen.append(line.strip())
            if line.startswith(("fresh", "resumed")):
                starts.append(line.strip())
                if line.startswith("resumed"):
                    resumed = int(line.split()[1])
                    if resumed >= STEPS - 4:  # little room left: kill it as it resumes
                        os.kill(proc.pid, signal.SIGKILL)
                        break
                    target = max(k, resumed + 1)
            if line.startswith("step ") and int(line.split()[1]) >= target:
                time.sleep(rng.uniform(0.0, 0.08))  # somewhere inside the next step
                os.kill(proc.pid, signal.SIGKILL)
                break
        assert proc.wait(timeout=60) == -signal.SIGKILL, seen
    proc = _launch(proxy, "killed-job", ckpt)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    starts += [line for line in out.splitlines() if line.startswith(("fresh", "resumed"))]
    sha = [line.split()[1] for line in out.splitlines() if line.startswith("sha ")][0]
    assert starts[0] == "fresh"
    resumed_at = [int(s.split()[1]) for s in starts[1:]]
    assert all(r >= k for r, k in zip(resumed_at, kills)), (starts, kills)
    print("kills after", kills, "starts", starts)
    assert sha == _uninterrupted_sha()
    assert list(ckpt.iterdir()) == []
