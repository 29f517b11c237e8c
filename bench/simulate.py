"""The planner against Slurm's behaviour in the simulator, on a busy slice of Philly.

The first 10,000 Philly jobs by submission time on 512 simulated GPUs
(tier rule random:20/30/50, seed 0, templates/policy.toml), run through the
``singularity`` scheduler (the project's planner) and the ``slurm`` baseline
in the same process. Value: the planner's average JCT; baseline: Slurm's;
goal: at least 40% lower (issue 7). Simulations are deterministic, so each
runs once. The whole-trace comparison is in docs/simulator.md.
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from pathlib import Path

from slurm_singularity import paths
from slurm_singularity.policy.load import load_policy
from slurm_singularity.sched.sim.run import SimSpec, simulate

TRACE = Path("/work/shared/traces/philly.csv")
JOBS, GPUS = 10_000, 512


def main() -> int:
    if not TRACE.exists():
        print(f"bench/simulate.py: {TRACE} not found", file=sys.stderr)
        return 1
    with open(TRACE, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = sorted((r for r in reader if r), key=lambda r: r[0])[:JOBS]
    policy = load_policy(paths.TEMPLATES_DIR / "policy.toml")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slice.csv"
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([header] + rows)
        for name in ("slurm", "singularity"):
            _, s = simulate(SimSpec(path, name, GPUS, policy))
            out[name] = s
            print(f"{name}: avg JCT {s['avg_jct_s'] / 3600:.2f} h, lost {s['lost_gpu_hours']:.0f} "
                  f"GPU-h, premium SLA {s['sla_attainment'].get('premium', 1):.1%}, "
                  f"{s['wall_s']:.1f} s", file=sys.stderr)
    value, base = out["singularity"]["avg_jct_s"] / 3600, out["slurm"]["avg_jct_s"] / 3600
    print(json.dumps({"bench": "simulate", "value": round(value, 3), "baseline": round(base, 3),
                      "ratio": round(value / base, 3), "unit": "h average JCT",
                      "goal": round(0.6 * base, 3), "ok": value <= 0.6 * base,
                      "jobs": JOBS, "gpus": GPUS,
                      "lost_gpu_hours": out["singularity"]["lost_gpu_hours"],
                      "premium_sla": out["singularity"]["sla_attainment"].get("premium"),
                      "sim_wall_s": round(out["singularity"]["wall_s"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
