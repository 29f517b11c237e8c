"""The planner against fair baselines in the simulator: full Philly, 512 GPUs.

Every scheduler of ``schedulers.COMPARED`` on the whole Philly trace (tier
rule random:20/30/50, seed 0, templates/policy.toml), one after the other in
this process, with the measured costs of ``sched/sim/constants.py``:
``singularity`` (the project's planner), ``slurm`` (grace-time checkpoints,
multifactor fair-share, EASY backfill), ``tiresias`` (the artifact's
2D-LAS), ``las-tiers`` (2D-LAS inside tiers) and ``slurm-no-ckpt`` (requeue
from zero: a BOUND, never the baseline). Value: singularity's average JCT;
baseline: the best average JCT of the fair baselines (slurm, tiresias,
las-tiers); goal (issue 14): value <= 0.8 x baseline, premium SLA >= 99%,
standard >= 95%, no lost GPU-hours. Simulations are deterministic, so each
runs once; each one's CPU time is reported (the simulator's speed).

The planner's ablations (``singularity:NAME``, ``schedulers.ABLATIONS``) run
in the same process: by default rigid (MIN = W), no hysteresis, no fair
share, the linear job model and no goodput-aware start (every scheduler
runs under the sub-linear job model of ``sched/goodput.py`` otherwise);
the verdict also asks that elastic is no worse than rigid.

CPU time goal (issue 14): the planner's run of the full trace in <= 60 s at
512 GPUs and <= 120 s at 100,000 (``cpu_goal_s`` and ``cpu_ok`` in the JSON
line); ``--plain`` runs the planner's plain path (``SimSpec.incremental``
False: the same decisions, no reuse) to measure what the fast path saves.

``--jobs N`` runs the first N jobs by submission only; ``--gpus`` another
size; ``--seed`` another draw of the tier rule; ``--only a,b`` a subset;
``--sweep 256,384,512,768 --seeds 5`` a load sweep (mean and 95% interval
over seeds of average JCT and SLA per tier, per load and scheduler). Prints a Markdown table (stderr) and, last,
one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

from slurm_singularity import paths
from slurm_singularity.policy.load import load_policy
from slurm_singularity.sched.sim.run import SimSpec, simulate
from slurm_singularity.sched.sim.schedulers import COMPARED

#: The planner's ablations run beside the baselines (``schedulers.ABLATIONS``):
#: rigid (MIN = W), no hysteresis, no fair share, the linear job model
#: (``singularity:linear``: what the sub-linear curve is worth) and no
#: goodput-aware start.
ABLATED = ("singularity:rigid", "singularity:no-hysteresis", "singularity:no-fair-share",
           "singularity:linear", "singularity:no-goodput")

TRACE = Path("/work/shared/traces/philly.csv")
FAIR = ("slurm", "tiresias", "las-tiers")
#: Issue 14's CPU time goals for the planner's run of the full trace, by GPUs.
CPU_GOAL_S = {512: 60.0, 100000: 120.0}
ROWS = [
    ("average JCT (h)", lambda s: f"{s['avg_jct_s'] / 3600:.2f}"),
    ("median JCT (h)", lambda s: f"{s['p50_jct_s'] / 3600:.2f}"),
    ("p99 JCT (h)", lambda s: f"{s['p99_jct_s'] / 3600:.1f}"),
    ("average queue (h)", lambda s: f"{s['avg_queue_s'] / 3600:.2f}"),
    ("premium SLA, jobs / GPU-h", lambda s: _sla(s, "premium")),
    ("standard SLA, jobs / GPU-h", lambda s: _sla(s, "standard")),
    ("premium / standard SLA, jobs of >= 10 min",
     lambda s: " / ".join(f"{s['sla_attainment_long_jobs'].get(t, 1):.1%}"
                          for t in ("premium", "standard"))),
    ("premium / standard / basic avg JCT (h)",
     lambda s: " / ".join(f"{s['jct_by_tier'].get(t, 0) / 3600:.2f}"
                          for t in ("premium", "standard", "basic"))),
    ("lost GPU-hours", lambda s: f"{s['lost_gpu_hours']:,.0f}"),
    ("overhead GPU-hours (ckpt, hand-over, restore, waits)",
     lambda s: f"{s['overhead_gpu_hours']:,.0f}"),
    ("GPU utilization", lambda s: f"{s['utilization']:.1%}"),
    ("preemptions (total / p99 / max per job)",
     lambda s: f"{s['preemptions']:,} / {s['preemptions_p99']:.0f} / {s['preemptions_max']}"),
    ("resizes", lambda s: f"{s['resizes']:,}"),
    ("Jain fairness across accounts", lambda s: f"{s['jain_fairness']:.3f}"),
    ("CPU time of the run (s)", lambda s: f"{s['cpu_s']:.0f}"),
]


def _sla(s: dict, tier: str) -> str:
    return (f"{s['sla_attainment'].get(tier, 1):.1%} / "
            f"{s['sla_attainment_gpu_hours'].get(tier, 1):.1%}")


#: Two-sided 95% Student t quantiles by degrees of freedom (n - 1 seeds).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: list[float]) -> str:
    """``mean +- half-width`` of the 95% interval over seeds (``mean`` alone for one)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return f"{mean:.2f}"
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    return f"{mean:.2f} +- {T95.get(n - 1, 1.96) * sd / n ** 0.5:.2f}"


def sweep(trace: Path, policy, names: list[str], loads: list[int], seeds: int) -> None:
    """Every scheduler at every load, seeds 0..seeds-1: mean and 95% interval (stderr)."""
    print(f"| GPUs | metric | {' | '.join(names)} |", file=sys.stderr)
    print("|---" * (len(names) + 2) + "|", file=sys.stderr)
    for gpus in loads:
        runs = {n: [simulate(SimSpec(trace, n, gpus, policy, seed=k))[1] for k in range(seeds)]
                for n in names}
        for label, get in (("avg JCT (h)", lambda s: s["avg_jct_s"] / 3600),
                           ("premium SLA %", lambda s: 100 * s["sla_attainment"].get("premium", 1)),
                           ("standard SLA %",
                            lambda s: 100 * s["sla_attainment"].get("standard", 1))):
            cells = [mean_ci([get(s) for s in runs[n]]) for n in names]
            print(f"| {gpus} | {label} | {' | '.join(cells)} |", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=0, help="first N jobs only (default: all)")
    ap.add_argument("--gpus", type=int, default=512)
    ap.add_argument("--only", default=",".join(COMPARED + ABLATED),
                    help="schedulers to run, comma-separated (default: the baselines and "
                         "the ablations singularity:rigid, :no-hysteresis, :no-fair-share, "
                         ":linear, :no-goodput; "
                         "others: :no-las, :start-small, :no-reserve, :las-preempt, "
                         ":rigid-las-preempt, :cost-aware-growth, :before, :rigid-linear)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the tier rule (default 0)")
    ap.add_argument("--json-out", type=Path, help="also write every summary here")
    ap.add_argument("--sweep", default="", metavar="GPUS,GPUS,...",
                    help="a load sweep instead: these cluster sizes, --seeds seeds each")
    ap.add_argument("--seeds", type=int, default=5, help="seeds per load in --sweep (default 5)")
    ap.add_argument("--plain", action="store_true",
                    help="the planner's plain path (no reuse within a pass): same decisions, "
                         "slower")
    args = ap.parse_args()
    if not TRACE.exists():
        print(f"bench/simulate.py: {TRACE} not found", file=sys.stderr)
        return 1
    policy = load_policy(paths.TEMPLATES_DIR / "policy.toml")
    names = [n for n in args.only.split(",") if n]
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        trace = TRACE
        if args.jobs:
            with open(TRACE, newline="") as f:
                reader = csv.reader(f)
                header = next(reader)
                rows = sorted((r for r in reader if r), key=lambda r: r[0])[:args.jobs]
            trace = Path(tmp) / "slice.csv"
            with open(trace, "w", newline="") as f:
                csv.writer(f).writerows([header] + rows)
        if args.sweep:
            sweep(trace, policy, names, [int(g) for g in args.sweep.split(",")], args.seeds)
            return 0
        for name in names:
            cpu = time.process_time()
            _, s = simulate(SimSpec(trace, name, args.gpus, policy, seed=args.seed,
                                    incremental=not args.plain))
            s["cpu_s"] = time.process_time() - cpu
            out[name] = s
            print(f"{name}: avg JCT {s['avg_jct_s'] / 3600:.2f} h, lost "
                  f"{s['lost_gpu_hours']:.0f} GPU-h, SLA {s['sla_attainment']}, "
                  f"{s['cpu_s']:.0f} s CPU", file=sys.stderr, flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=1) + "\n")
    print("| metric | " + " | ".join(n + (" (bound)" if n == "slurm-no-ckpt" else "")
                                      for n in names) + " |", file=sys.stderr)
    print("|---" * (len(names) + 1) + "|", file=sys.stderr)
    for label, cell in ROWS:
        print(f"| {label} | " + " | ".join(cell(out[n]) for n in names) + " |", file=sys.stderr)
    fair = {n: out[n]["avg_jct_s"] / 3600 for n in FAIR if n in out}
    verdict = {"bench": "simulate", "unit": "h average JCT", "gpus": args.gpus, "seed": args.seed,
               "jobs": out[names[0]]["jobs"]}
    if "singularity" in out and fair:
        best = min(fair, key=fair.get)
        s = out["singularity"]
        value = s["avg_jct_s"] / 3600
        rigid = out.get("singularity:rigid")
        elastic_ok = rigid is None or s["avg_jct_s"] <= rigid["avg_jct_s"]
        ok = (value <= 0.8 * fair[best] and s["lost_gpu_hours"] == 0
              and s["sla_attainment"].get("premium", 1) >= 0.99
              and s["sla_attainment"].get("standard", 1) >= 0.95 and elastic_ok)
        verdict.update({"value": round(value, 3), "baseline": round(fair[best], 3),
                        "baseline_scheduler": best, "ratio": round(value / fair[best], 3),
                        "goal": round(0.8 * fair[best], 3), "ok": ok,
                        "premium_sla": s["sla_attainment"].get("premium"),
                        "standard_sla": s["sla_attainment"].get("standard"),
                        "lost_gpu_hours": s["lost_gpu_hours"],
                        "elastic_le_rigid": None if rigid is None else elastic_ok})
    verdict["cpu_s"] = {n: round(out[n]["cpu_s"], 1) for n in names}
    goal = CPU_GOAL_S.get(args.gpus)
    if goal and "singularity" in out and not args.jobs:
        verdict["cpu_goal_s"] = goal
        verdict["cpu_ok"] = out["singularity"]["cpu_s"] <= goal
    if args.plain:
        verdict["plain"] = True
    print(json.dumps(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
