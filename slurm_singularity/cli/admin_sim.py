"""``singularity-admin simulate``: replay a workload trace through the
project's planner or a baseline scheduler and write a report (docs/simulator.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import paths
from ..policy.api import PolicyError
from ..sched.sim.schedulers import SCHEDULERS
from ..sched.sim.trace import DEFAULT_TIER_RULE, FORMATS, TraceError, describe_rule


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="replay a trace through a scheduler; write a report",
                       description="Replay a GPU workload trace through the project's planner "
                                   "(singularity) or a baseline (slurm, tiresias, ...) and write "
                                   "summary.json, plots and report.md into --out.")
    p.add_argument("--trace", type=Path, required=True, help="trace CSV")
    p.add_argument("--format", dest="fmt", default="philly", choices=FORMATS,
                   help="trace format (default philly)")
    p.add_argument("--policy", type=Path, default=paths.TEMPLATES_DIR / "policy.toml",
                   help="policy file (default templates/policy.toml)")
    p.add_argument("--scheduler", required=True, metavar="NAME",
                   help=f"one of {', '.join(SCHEDULERS)} (docs/simulator.md)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the simulated cluster")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--tiers", default=None, metavar="RULE",
                   help=f"tier and elastic rule for traces without them (default "
                        f"{DEFAULT_TIER_RULE}; 'trace' for alibaba-v2023): random:P/S/B, "
                        f"cluster:P/S/B, size:A/B or trace")
    p.add_argument("--seed", type=int, default=0, help="seed of the tier rule (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output folder (replaced at the end)")
    p.add_argument("--compare", type=Path, nargs="*", default=[], metavar="DIR",
                   help="earlier output folders to put side by side in report.md")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_simulate)


def _fail(msg: object) -> int:
    print(f"singularity-admin simulate: error: {msg}", file=sys.stderr)
    return 2


def _simulate(args: argparse.Namespace) -> int:
    from . import extras
    unused = ("tqdm",) if args.no_progress else ()
    if (rc := extras.require("sim", "singularity-admin simulate", unused)) is not None:
        return rc
    from ..policy.load import load_policy
    from ..sched.sim.run import SimError, SimSpec, load_jobs, simulate, write_outputs
    try:
        policy = load_policy(args.policy)
        spec = SimSpec(trace=args.trace, scheduler=args.scheduler, gpus=args.gpus, policy=policy,
                       policy_path=str(args.policy), fmt=args.fmt,
                       gpus_per_node=args.gpus_per_node, tier_rule=args.tiers, seed=args.seed,
                       compare=tuple(args.compare))
        print(f"simulate: {args.scheduler} on {args.gpus} GPUs; tier rule {spec.rule!r}: "
              f"{describe_rule(spec.rule)}", file=sys.stderr)
        notes: dict = {}
        jobs = load_jobs(spec, notes)
        if notes.get("dropped") or notes.get("rounded_up") or notes.get("services"):
            dropped = ", ".join(f"{n} {why}" for why, n in notes["dropped"].items()) or "none"
            print(f"simulate: {args.trace}: pods dropped: {dropped}; "
                  f"{notes['rounded_up']} pods asking for a share of a GPU rounded up to one "
                  f"whole GPU; {notes['services']} services (still running at the end: "
                  f"simulated, not counted as jobs)", file=sys.stderr)
        bar = None
        if not args.no_progress:
            from tqdm import tqdm
            bar = tqdm(total=len(jobs), desc=args.scheduler, unit=" jobs", file=sys.stderr,
                       mininterval=1.0)
        try:
            engine, summary = simulate(spec, jobs=jobs, notes=notes,
                                       progress=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        write_outputs(args.out, engine, summary, spec.compare)
    except (PolicyError, TraceError, SimError) as exc:
        return _fail(exc)
    print(f"{args.scheduler}: {summary['jobs']} jobs, avg JCT {summary['avg_jct_s'] / 3600:.2f} h, "
          f"utilization {summary['utilization']:.1%}, lost {summary['lost_gpu_hours']:.0f} GPU-h, "
          f"SLA {', '.join(f'{t} {v:.1%}' for t, v in summary['sla_attainment'].items())}; "
          f"wrote {args.out}/summary.json, report.md and plots ({summary['wall_s']:.1f} s)")
    return 0
