"""Chaos on the real local Slurm (issue 19, "what it must show"): one
training job of >= 200 steps lives through Slurm's own preemption
(``preemption = "slurm"``), the daemon's resizes, double SIGTERMs within a
second, a ``kill -9`` of the daemon in the middle of a resize and a
slurmctld restart, and must end with the parameters of an uninterrupted run,
no FAILED run in its history or in sacct, and no action of the daemon's
taken twice.

The order of the events is fixed (each needs the job running again); their
timing is random, from a seed printed at the start, so that a failure can be
replayed with ``SINGULARITY_CHAOS_SEED``."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_singularity import paths
from slurm_singularity.cluster import local
from slurm_singularity.runtime.history import read_history

from test_preemption import FINAL, premium_burst, steps_done, wait_until
from test_schedd import Schedd, _cancel_all, apply_policy

pytestmark = pytest.mark.cluster

BIN = Path(sys.executable).parent
TRAIN = paths.REPO_ROOT / "examples" / "train_lm.py"
STEPS = 220
WORLD = 4


def reference_sha(tmp_path: Path) -> str:
    r = subprocess.run([str(BIN / "singularity-run"), "--devices", "2", "--world-size",
                        str(WORLD), "--ckpt-dir", str(tmp_path / "ref"), str(TRAIN), "--steps",
                        str(STEPS)], capture_output=True, text=True, timeout=300)
    m = FINAL.search(r.stdout)
    assert m, r.stdout + r.stderr
    return m.group(2)


def runs_started(out: Path) -> int:
    return out.read_text().count("run restart=") if out.exists() else 0


def test_a_training_job_survives_preemption_resizes_double_signals_and_crashes(
        slurm_cluster, tmp_path):
    seed = int(os.environ.get("SINGULARITY_CHAOS_SEED", random.randrange(1 << 30)))
    print(f"chaos seed {seed} (replay with SINGULARITY_CHAOS_SEED={seed})")
    rng = random.Random(seed)
    cluster = slurm_cluster
    _cancel_all(cluster)
    apply_policy(cluster, paths.TEMPLATES_DIR / "policy.toml")   # preemption = "slurm"
    want = reference_sha(tmp_path)

    ckpt, out = tmp_path / "ckpt", tmp_path / "train.out"
    script = tmp_path / "train.sh"
    script.write_text(f"""#!/bin/bash
echo "run restart=${{SLURM_RESTART_COUNT:-0}} gpus=$CUDA_VISIBLE_DEVICES"
srun --ntasks-per-node=1 {BIN / 'singularity-run'} {TRAIN} --steps {STEPS} \\
     --step-sleep 0.2 --ckpt-every 10
""")
    job = int(cluster.run("sbatch", "--parsable", "--sla=basic", "--elastic=1:2",
                          f"--world-size={WORLD}", "-N1", "--gres=gpu:1", f"--ckpt-dir={ckpt}",
                          "-o", str(out), "--open-mode=append", str(script),
                          check=True).stdout.strip())
    schedd = Schedd(cluster, tmp_path / "schedd.log")
    try:
        # 1. the daemon grows the job 1 -> 2 (a resize); kill -9 it right
        #    after it marked the job, start it again
        wait_until(lambda: steps_done(out) >= 5, 120, "the job's first steps")
        schedd.start()
        wait_until(lambda: ",resize=" in cluster.client.show_job(job).get("AdminComment", ""),
                   60, "the daemon's grow", every=0.02)
        time.sleep(rng.uniform(0, 0.5))
        schedd.kill()
        time.sleep(rng.uniform(0.5, 2))
        schedd.start()
        wait_until(lambda: runs_started(out) >= 2 and steps_done(out) >= 30, 180,
                   "the grown job to train on")

        # 2. two SIGTERMs within a second
        runs = runs_started(out)
        cluster.run("scancel", "--signal=TERM", str(job), check=True)
        time.sleep(rng.uniform(0, 1))
        cluster.run("scancel", "--signal=TERM", str(job))
        wait_until(lambda: runs_started(out) > runs and steps_done(out) >= 70, 180,
                   "the job to come back after the double SIGTERM")

        # 3. Slurm's own preemption by a premium job (the daemon may preempt
        #    it too: its SIGTERM then follows Slurm's)
        runs = runs_started(out)
        cluster.wait_job(premium_burst(cluster, seconds=2), timeout=120)
        wait_until(lambda: runs_started(out) > runs and steps_done(out) >= 110, 180,
                   "the job to come back after the preemption")

        # 4. slurmctld restarts while the job trains
        time.sleep(rng.uniform(0, 3))
        local.restart(cluster.spec.state_dir, "slurmctld")

        # 5. another preemption and double signal at once
        wait_until(lambda: steps_done(out) >= 140, 180, "step 140")
        runs = runs_started(out)
        premium = premium_burst(cluster, seconds=2)
        time.sleep(rng.uniform(0, 1))
        cluster.run("scancel", "--signal=TERM", str(job))
        cluster.wait_job(premium, timeout=120)
        rec = cluster.wait_job(job, timeout=300)
    finally:
        schedd.stop()
        _cancel_all(cluster)
    text = out.read_text()
    assert rec["JobState"] == "COMPLETED", (rec, text[-3000:])
    m = FINAL.search(text)
    assert m and int(m.group(1)) == STEPS, text[-3000:]
    assert m.group(2) == want, "the run differs from the uninterrupted one"

    history = read_history(ckpt)
    assert "failed" not in [h.stop.value for h in history], history
    assert len(history) >= 5, history                         # it was stopped >= 4 times
    deadline = time.monotonic() + 30      # accounting arrives asynchronously
    states = [r.state for r in cluster.client.job_runs(job)]
    while states[-1:] != ["COMPLETED"] and time.monotonic() < deadline:
        time.sleep(0.5)
        states = [r.state for r in cluster.client.job_runs(job)]
    assert "FAILED" not in states and states[-1] == "COMPLETED", states

    log = schedd.text()
    # no action twice: each action (named by its time) is signalled at most
    # once, requeued at most once; nothing is signalled again
    for what in ("sent SIG", "requeued it", "killed it"):
        ids = re.findall(rf"\[job {job}\].*{what}\w* \(action (\d+)\)", log)
        assert len(ids) == len(set(ids)), (what, ids, log[-4000:])
    assert re.search(rf"\[job {job}\].*sent SIG", log), log[-4000:]
    assert "signalled again" not in log and "Traceback" not in log, log[-4000:]
    print(f"chaos: runs {[(h.devices, h.first_step, h.last_step, h.stop.value) for h in history]}"
          f"; sacct {states}; daemon: "
          + "; ".join(re.findall(rf"\[job {job}\] ((?:grow|shrink|preempt) \d+ -> \d+"
                                 rf"|resize to \d+: [^(]*)", log)))
