"""Preemption cost with the runtime vs Slurm alone, on the real local Slurm.

Brings up its own 2-node x 4-GPU cluster (own ports and state directory).
Each repetition, alternating:

- runtime: a basic job trains examples/train_lm.py (W=8 on 4 GPUs) under
  ``srun singularity-run``; a premium job that needs the whole cluster
  arrives; Slurm sends SIGTERM, the runtime checkpoints at an agreed step
  and exits 75, Slurm requeues it, it restarts and restores;
- Slurm alone: the same training script with nothing listening for the
  signal and nothing to restore, under Slurm's default preemption
  (GraceTime=0: killed, requeued, starts again from step 0). Found on the
  way: with a grace time, a plain `srun` job whose step dies on the SIGTERM
  ends FAILED and is never requeued; the runtime's exit code 75 is what gets
  it requeued (RequeueExit).

Measured for each: (a) from the premium job's submission (Slurm preempts at
once) to the premium job running, i.e. the GPUs being free; (b) from the
requeued job's batch script starting to its first new training step. The
requeue delay between them is Slurm's own and the same for both.

Goal (issue 5): preemption adds at most the checkpoint time + 2 s over Slurm
alone: value = (a)+(b) with the runtime, baseline = (a)+(b) alone, ok when
value <= baseline + checkpoint time + 2 s. Last line: the JSON verdict.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slurm_singularity import paths
from slurm_singularity.cluster import local
from slurm_singularity.cluster.api import ClusterSpec
from slurm_singularity.policy.load import load_policy

REPS = int(os.environ.get("BENCH_PREEMPT_REPS", "3"))
CTLD_PORT = int(os.environ.get("BENCH_PREEMPT_CTLD_PORT", "38817"))
BIN = Path(sys.executable).parent
TRAIN = paths.REPO_ROOT / "examples" / "train_lm.py"
STEP = re.compile(r"^step (\d+) ", re.M)


def script(work: Path, runtime: bool) -> Path:
    if runtime:
        cmd = f"srun --ntasks-per-node=1 {BIN / 'singularity-run'} {TRAIN} --steps 100000 --step-sleep 0.05"
    else:
        # the same script with nothing listening for SIGTERM and nothing to
        # restore: what Slurm alone does with it (killed, requeued, from step 0)
        cmd = (f"export SINGULARITY_PREEMPT_SIGNAL=USR2\n"
               f"srun --ntasks-per-node=1 {BIN / 'singularity-run'} --ckpt-dir {work}/plain-$RANDOM "
               f"{TRAIN} --steps 100000 --step-sleep 0.05 --ckpt-every 1000000")
    path = work / ("rt.sh" if runtime else "plain.sh")
    path.write_text(f"""#!/bin/bash
python3 -c 'import time; print("run", time.time(), flush=True)'
{cmd}
""")
    return path


def watch(out: Path, runs: int, timeout: float = 180) -> tuple[float, float]:
    """Wait for run number ``runs`` to print its first step; returns (run
    start from the script, time its first step appeared), polled at 10 ms."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = out.read_text() if out.exists() else ""
        starts = [float(l.split()[1]) for l in text.splitlines() if l.startswith("run ")]
        if len(starts) >= runs:
            tail = text[text.rfind("run "):]
            if STEP.search(tail):
                return starts[runs - 1], time.time()
        time.sleep(0.01)
    raise RuntimeError(f"run {runs} printed no step within {timeout} s ({out})")


def premium_start(env, work: Path, tag: str) -> tuple[float, float]:
    marker = work / f"premium-{tag}.out"
    t0 = time.time()
    r = subprocess.run(["sbatch", "--parsable", "--sla=premium", "--account=research", "-N2",
                        "--gres=gpu:4", "-o", str(marker), "--wrap",
                        "python3 -c 'import time; print(time.time())'; sleep 1"],
                       env=env, capture_output=True, text=True, check=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if marker.exists() and marker.read_text().strip():
            return t0, float(marker.read_text().split()[0])
        time.sleep(0.02)
    raise RuntimeError(f"premium job {r.stdout.strip()} did not start")


def one(env, work: Path, runtime: bool, rep: int) -> dict[str, float]:
    # Slurm alone preempts with its default GraceTime=0 (kill, then requeue): a
    # plain job that died on SIGTERM within a grace time would end FAILED
    # instead of being requeued. The runtime gets the policy's grace time.
    grace = "30" if runtime else "0"
    subprocess.run(["scontrol", "update", "PartitionName=basic", f"GraceTime={grace}"],
                   env=env, check=True, capture_output=True)
    out = work / f"{'rt' if runtime else 'plain'}-{rep}.out"
    extra = [f"--ckpt-dir={work / f'ckpt-{rep}'}"] if runtime else []
    r = subprocess.run(["sbatch", "--parsable", "--sla=basic", "--world-size=8", "-N1",
                        "--gres=gpu:4", "-o", str(out), "--open-mode=append", *extra,
                        str(script(work, runtime))], env=env, capture_output=True, text=True,
                       check=True)
    job = r.stdout.strip()
    watch(out, 1)
    time.sleep(2)   # a few steps in
    t_submit, t_premium = premium_start(env, work, f"{rep}-{runtime}")
    restart, first_step = watch(out, 2)
    subprocess.run(["scancel", job], env=env, capture_output=True)
    time.sleep(2)
    return {"free_s": t_premium - t_submit, "resume_s": first_step - restart,
            "requeue_wait_s": restart - t_premium}


def checkpoint_seconds(work: Path) -> float:
    """How long the runtime's preemption checkpoint took, from its metadata."""
    times = []
    for meta in work.glob("ckpt-*/ckpt-*.json"):
        data = json.loads(meta.read_text())
        if "write_s" in data:
            times.append(float(data["write_s"]))
    return statistics.median(times) if times else 0.0


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-preempt-"))
    spec = ClusterSpec(state_dir=work / "cluster", nodes=2, gpus_per_node=4, ctld_port=CTLD_PORT,
                       slurmd_base_port=CTLD_PORT + 1, cluster_name="benchpreempt")
    local.up(spec, load_policy(paths.TEMPLATES_DIR / "policy.toml"))
    env = {**os.environ, **spec.env(), "MASTER_ADDR": "127.0.0.1"}
    rt, alone = [], []
    try:
        for rep in range(REPS):
            rt.append(one(env, work, True, rep))
            print(f"rep {rep} runtime: {rt[-1]}", file=sys.stderr, flush=True)
            alone.append(one(env, work, False, rep))
            print(f"rep {rep} Slurm alone: {alone[-1]}", file=sys.stderr, flush=True)
    finally:
        local.down(spec.state_dir)

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    value = med(rt, "free_s") + med(rt, "resume_s")
    base = med(alone, "free_s") + med(alone, "resume_s")
    ckpt = checkpoint_seconds(work)
    print(json.dumps({
        "bench": "preempt", "value": round(value, 3), "baseline": round(base, 3),
        "ratio": round(value / base, 3), "unit": "s: signal->GPUs free + restart->first new step",
        "goal": f"value <= baseline + checkpoint + 2 s = {base + ckpt + 2:.2f}",
        "ok": value <= base + ckpt + 2.0,
        "signal_to_free_s": round(med(rt, "free_s"), 3),
        "restart_to_first_step_s": round(med(rt, "resume_s"), 3),
        "slurm_alone_signal_to_free_s": round(med(alone, "free_s"), 3),
        "slurm_alone_restart_to_first_step_s": round(med(alone, "resume_s"), 3),
        "requeue_wait_s": round(med(rt + alone, "requeue_wait_s"), 3),
        "checkpoint_s": round(ckpt, 3), "repetitions": REPS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
