"""Resize time vs a plain Slurm requeue-and-restart of the same job.

Brings up its own 2-node x 8-GPU local cluster (own ports and state
directory) and one job that behaves like the runtime at the signal (writes
a timestamp at each start, exits with the requeue code on SIGTERM; the
checkpoint time is measured separately by bench/checkpoint.py). Alternating,
several repetitions:

- resize: the daemon's executor shrinks the job 16 -> 8 or grows it 8 -> 16
  (mark, signal, requeue, new request, release), driven pass by pass like
  the daemon; timed from the decision to the job running at its new size;
- baseline: ``scontrol requeue`` of the same job at the same size, timed
  until it runs again (Slurm's own requeue cycle, with this project's
  slurm.conf, whose requeue delay is already cut from 120 s to ~11 s).

Then, for the record (issue 6 asks to measure both), shrinking 2 nodes ->
1 in place, as Slurm 22.05 allows for whole nodes only: the job's own
``scontrol update JobId=$SLURM_JOB_ID NumNodes=1`` (only from inside the
job does scontrol write the resize script that updates the job's
environment), then a new srun step, vs the executor's shrink of a fresh
elastic job of the same shape, alternating (inplace_shrink_median_s,
requeue_shrink_median_s).

Goal (issue 6): resize <= 0.5 x the plain requeue cycle + checkpoint time.
The JSON's ratio is resize / requeue; goal 0.5 (checkpoint time excluded on
both sides). Last line: the JSON verdict.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slurm_singularity import contract, paths
from slurm_singularity.cluster import local
from slurm_singularity.cluster.api import ClusterSpec
from slurm_singularity.policy.load import load_policy
from slurm_singularity.sched.api import Action, ActionKind
from slurm_singularity.sched.executor import Executor, ExecutorSettings
from slurm_singularity.sched.observe import observe
from slurm_singularity.slurm.cli import CliSlurmClient

REPS = int(os.environ.get("BENCH_RESIZE_REPS", "3"))
CTLD_PORT = int(os.environ.get("BENCH_RESIZE_CTLD_PORT", "37817"))
GOAL = 0.5
#: the executor signals a step only once it ran this long (its signal
#: handlers are in place); the bench waits as long before each decision so
#: that it times the resize, not that wait
SETTLE_S = ExecutorSettings().step_settle_s + 0.5

JOB = f"""#!/bin/bash
python3 -c 'import time; print("start", time.time(), flush=True)'
srun --ntasks-per-node=1 bash -c 'trap "exit {contract.REQUEUE_EXIT_CODE}" TERM; for i in $(seq 6000); do sleep 0.05; done'
"""


#: A job that resizes in place: after its step ends it waits for the new
#: node count in the file "go", shrinks its own allocation, and runs again.
INPLACE_JOB = """#!/bin/bash
cd {d}
while true; do
  python3 -c 'import time; print("start", time.time(), flush=True)'
  srun -N$SLURM_JOB_NUM_NODES --ntasks-per-node=1 bash -c \
      'trap "exit {code}" TERM; for i in $(seq 6000); do sleep 0.05; done'
  while [ ! -f go ]; do sleep 0.01; done
  n=$(cat go); rm -f go
  scontrol update JobId=$SLURM_JOB_ID NumNodes=$n >/dev/null
  . ./slurm_job_${{SLURM_JOB_ID}}_resize.sh
done
"""


def starts(out: Path) -> list[float]:
    try:
        return [float(l.split()[1]) for l in out.read_text().splitlines() if l.startswith("start ")]
    except FileNotFoundError:
        return []


def wait_start(out: Path, n: int, timeout: float = 120) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = starts(out)
        if len(s) >= n:
            return s[n - 1]
        time.sleep(0.02)
    raise RuntimeError(f"job did not start a run #{n} within {timeout} s")


def resize(client, policy, executor, job_id: int, to: int) -> float:
    """Drive one resize like the daemon does; returns the decision time."""
    obs = observe(client.jobs(), client.nodes(), policy, time.time())
    view = obs.views[job_id]
    kind = ActionKind.SHRINK if to < view.devices else ActionKind.GROW
    t0 = time.time()
    executor.execute(Action(kind, job_id, view.devices, to, "benchmark"), view)
    while True:
        obs = observe(client.jobs(), client.nodes(), policy, time.time())
        view = obs.views[job_id]
        if view.marks.resize_to is None:
            return t0
        executor.continue_resize(view)
        time.sleep(0.05)


def wait_step(client, job: int, present: bool) -> None:
    deadline = time.monotonic() + 60
    while bool(client.running_steps(job)) != present:
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job}: step {'start' if present else 'end'} not seen")
        time.sleep(0.005)


def inplace_vs_requeue(state: Path, env: dict, client, policy, executor) -> tuple[list, list]:
    """Shrink 2 nodes -> 1 in place vs by the executor, alternating; seconds
    from the decision to the new step running."""
    inplace, requeue = [], []
    for rep in range(REPS):
        d = state / f"inplace{rep}"
        d.mkdir()
        (d / "job.sh").write_text(INPLACE_JOB.format(d=d, code=contract.REQUEUE_EXIT_CODE))
        out = d / "out"
        job = int(subprocess.run(["sbatch", "--parsable", "--sla=basic", "-N2", "--gres=gpu:8",
                                  "-o", str(out), str(d / "job.sh")], env=env, check=True,
                                 capture_output=True, text=True).stdout)
        wait_start(out, 1)
        wait_step(client, job, True)
        time.sleep(SETTLE_S)
        t0 = time.time()
        subprocess.run(["scancel", "--signal=TERM", client.running_steps(job)[0][0]],
                       env=env, check=True)
        wait_step(client, job, False)
        (d / "go").write_text("1\n")
        wait_start(out, 2)
        wait_step(client, job, True)
        inplace.append(time.time() - t0)
        subprocess.run(["scancel", str(job)], env=env)
        time.sleep(1.0)

        d = state / f"requeue{rep}"
        d.mkdir()
        (d / "job.sh").write_text(JOB)
        out = d / "out"
        job = int(subprocess.run(["sbatch", "--parsable", "--sla=basic", "--elastic=8:16",
                                  "--world-size=16", "-N2", "--gres=gpu:8", "--open-mode=append",
                                  "-o", str(out), str(d / "job.sh")], env=env, check=True,
                                 capture_output=True, text=True).stdout)
        wait_start(out, 1)
        wait_step(client, job, True)
        time.sleep(SETTLE_S)
        t0 = resize(client, policy, executor, job, 8)
        wait_start(out, 2)
        wait_step(client, job, True)
        requeue.append(time.time() - t0)
        subprocess.run(["scancel", str(job)], env=env)
        print(f"rep {rep}: shrink in place {inplace[-1]:.2f} s, by requeue {requeue[-1]:.2f} s",
              file=sys.stderr, flush=True)
        time.sleep(1.0)
    return inplace, requeue


def main() -> int:
    state = Path(tempfile.mkdtemp(prefix="bench-resize-"))
    spec = ClusterSpec(state_dir=state, nodes=2, gpus_per_node=8, ctld_port=CTLD_PORT,
                       slurmd_base_port=CTLD_PORT + 1, cluster_name="benchresize")
    policy = load_policy(paths.TEMPLATES_DIR / "policy.toml")
    local.up(spec, policy)
    env = {**os.environ, **spec.env()}
    client = CliSlurmClient(spec.env())
    executor = Executor(client, policy, ExecutorSettings(gpus_per_node=8))
    try:
        script = state / "job.sh"
        script.write_text(JOB)
        out = state / "job.out"
        r = subprocess.run(["sbatch", "--parsable", "--sla=basic", "--elastic=8:16",
                            "--world-size=16", "-N2", "--gres=gpu:8", "--open-mode=append",
                            "-o", str(out), str(script)], env=env, capture_output=True,
                           text=True, check=True)
        job = int(r.stdout.strip())
        n = 1
        wait_start(out, n)
        shrink, grow, requeue = [], [], []
        size = 16
        for rep in range(REPS):
            # resize: shrink or grow, alternating with the baseline
            wait_step(client, job, True)
            time.sleep(SETTLE_S)
            to = 8 if size == 16 else 16
            t0 = resize(client, policy, executor, job, to)
            n += 1
            took = wait_start(out, n) - t0
            (shrink if to < size else grow).append(took)
            size = to
            print(f"rep {rep}: {'shrink' if to == 8 else 'grow'} {took:.2f} s",
                  file=sys.stderr, flush=True)
            # baseline: plain Slurm requeue of the same job, same size
            time.sleep(1.0)
            t0 = time.time()
            subprocess.run(["scontrol", "requeue", str(job)], env=env, check=True,
                           capture_output=True)
            n += 1
            requeue.append(wait_start(out, n) - t0)
            print(f"rep {rep}: plain requeue {requeue[-1]:.2f} s", file=sys.stderr, flush=True)
            # undo the size for the next rep by the resize path (also measured)
            wait_step(client, job, True)
            time.sleep(SETTLE_S)
            to = 8 if size == 16 else 16
            t0 = resize(client, policy, executor, job, to)
            n += 1
            (shrink if to < size else grow).append(wait_start(out, n) - t0)
            size = to
        subprocess.run(["scancel", str(job)], env=env)
        time.sleep(1.0)
        inplace, requeue_shrink = inplace_vs_requeue(state, env, client, policy, executor)
    finally:
        local.down(state)
    value = statistics.median(shrink + grow)
    base = statistics.median(requeue)
    print(json.dumps({
        "bench": "resize", "value": round(value, 3), "baseline": round(base, 3),
        "ratio": round(value / base, 3), "unit": "s from decision to running at the new size",
        "goal": GOAL, "ok": value / base <= GOAL,
        "shrink_median_s": round(statistics.median(shrink), 3),
        "grow_median_s": round(statistics.median(grow), 3),
        "plain_requeue_median_s": round(base, 3), "repetitions": REPS,
        "inplace_shrink_median_s": round(statistics.median(inplace), 3),
        "requeue_shrink_median_s": round(statistics.median(requeue_shrink), 3),
        "note": "checkpoint time excluded on both sides; see bench/checkpoint.py"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
