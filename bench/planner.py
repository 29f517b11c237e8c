"""One planner pass over a synthetic fleet: 12,500 nodes x 8 GPUs, 50,000 jobs.

Goal: one pass of ``sched.planner.plan`` in <= 1 s. Baseline, in the same
process on the same state: a plain priority-sorted FIFO pass (sort pending
jobs by tier then submission time, start each at its MIN while GPUs are free)
-- the least any scheduler pass does. Alternating runs, median of each, in
CPU time of this process (so that other work on a shared machine does not
count). Running jobs started or resized up to an hour ago, so that the
planner's hysteresis (``PlannerSettings.min_run_s``, 10 minutes) holds about
a sixth of them. The last line is the JSON result.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time

from slurm_singularity.policy.api import Tier
from slurm_singularity.sched.api import ActionKind, ClusterState, JobPhase, JobState, NodeState
from slurm_singularity.sched.planner import plan
from slurm_singularity.sched.sim.policies import reference_policy

NODES, GPN, JOBS, REPS = 12_500, 8, 50_000, 5


def fleet(seed: int = 1) -> ClusterState:
    rng = random.Random(seed)
    free = [GPN] * NODES
    node = 0
    jobs = []
    for k in range(JOBS):
        tier = rng.choices(list(Tier), weights=(1, 3, 6))[0]
        w = rng.choice((1, 1, 1, 2, 4, 8, 8, 16, 32))
        lo = max(1, w // rng.choice((1, 2, 4)))
        size = rng.choice([d for d in (1, 2, 4, 8, 16, 32) if lo <= d <= w and w % d == 0])
        running = rng.random() < 0.8
        placement = []
        if running:
            left = size
            while left and node < NODES:
                give = min(free[node], left)
                free[node] -= give
                left -= give
                placement.append((f"n{node}", give))
                if free[node] == 0:
                    node += 1
            running = left == 0
            if not running:        # fleet full: give the GPUs back, job stays pending
                for name, n in placement:
                    free[int(name[1:])] += n
                placement = []
        jobs.append(JobState(k, tier, f"acct{rng.randrange(40)}", w, lo, w,
                             JobPhase.RUNNING if running else JobPhase.PENDING,
                             rng.uniform(0, 3600), size if running else 0, tuple(placement),
                             rng.uniform(0, 3000), None, (size / w) if running else 0.0,
                             rng.uniform(0, 3600) if running else None))
    # free up a little so that starts, shrinks and grows all happen
    nodes = tuple(NodeState(f"n{i}", GPN, free[i]) for i in range(NODES))
    return ClusterState(3600.0, nodes, tuple(jobs))


def fifo_pass(state: ClusterState) -> list[tuple[int, int]]:
    free = state.free_gpus
    pending = sorted((j for j in state.jobs if j.phase is JobPhase.PENDING),
                     key=lambda j: (-j.tier.rank, j.submit_time, j.job_id))
    out = []
    for j in pending:
        if j.min_devices <= free and j.world_size % j.min_devices == 0:
            free -= j.min_devices
            out.append((j.job_id, j.min_devices))
    return out


def main() -> int:
    state = fleet()
    policy = reference_policy({f"acct{i}": 1.0 + i % 3 for i in range(40)})
    running = sum(1 for j in state.jobs if j.phase is JobPhase.RUNNING)
    print(f"fleet: {NODES * GPN} GPUs, {len(state.jobs)} jobs ({running} running), "
          f"{state.free_gpus} GPUs free", file=sys.stderr)
    t_plan, t_base = [], []
    for _ in range(REPS):
        t0 = time.process_time()
        fifo_pass(state)
        t_base.append(time.process_time() - t0)
        t0 = time.process_time()
        actions = plan(state, policy)
        t_plan.append(time.process_time() - t0)
    kinds = {k.value: sum(1 for a in actions if a.kind is k) for k in ActionKind}
    value, base = statistics.median(t_plan), statistics.median(t_base)
    print(f"planner pass: {value:.3f} s median of {REPS}; FIFO pass: {base:.3f} s; actions: {kinds}")
    print(json.dumps({"bench": "planner", "value": round(value, 4), "baseline": round(base, 4),
                      "ratio": round(value / base, 2), "unit": "s", "goal": 1.0,
                      "ok": value <= 1.0, "gpus": NODES * GPN, "jobs": len(state.jobs),
                      "actions": kinds, "baseline_kind": "priority-sorted FIFO pass"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
