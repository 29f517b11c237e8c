"""Plots (PNG, matplotlib Agg) and report.md for one or several simulation runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .engine import Engine

#: Schedulers that are bounds, not baselines: the report says so wherever they appear.
BOUNDS = ("slurm-no-ckpt",)

#: Rows of the side-by-side table: (summary key, label, format).
ROWS = (
    ("jobs", "jobs", "{:d}"),
    ("avg_jct_s", "average JCT (h)", "h"),
    ("p50_jct_s", "median JCT (h)", "h"),
    ("p99_jct_s", "p99 JCT (h)", "h"),
    ("avg_queue_s", "average queue time (h)", "h"),
    ("utilization", "GPU utilization", "{:.1%}"),
    ("lost_gpu_hours", "lost GPU-hours (work thrown away by kills)", "{:,.0f}"),
    ("overhead_gpu_hours", "GPU-hours held without progress (checkpoint, restore, waits)",
     "{:,.0f}"),
    ("preemptions", "preemptions", "{:,d}"),
    ("preemptions_p99", "preemptions of one job, p99", "{:.0f}"),
    ("preemptions_max", "preemptions of one job, max", "{:,d}"),
    ("resizes", "resizes", "{:,d}"),
    ("jain_fairness", "Jain fairness across accounts", "{:.3f}"),
    ("wall_s", "simulation wall time (s)", "{:.1f}"),
)


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "h":
        return f"{value / 3600:.2f}"
    return fmt.format(value)


def comparison_table(runs: list[dict[str, Any]]) -> str:
    """A markdown table, one column per run (summary.json dicts)."""
    head = "| metric | " + " | ".join(r["scheduler"] + (" (a bound)" if r["scheduler"] in BOUNDS
                                                         else "") for r in runs) + " |"
    lines = [head, "|---" * (len(runs) + 1) + "|"]
    for key, label, fmt in ROWS:
        lines.append(f"| {label} | " + " | ".join(_fmt(r.get(key), fmt) for r in runs) + " |")
    tiers = [t for t in ("premium", "standard", "basic") if any(t in r["sla_attainment"] for r in runs)]
    for t in tiers:
        lines.append(f"| {t}: SLA attainment | " + " | ".join(
            _fmt(r["sla_attainment"].get(t), "{:.1%}") for r in runs) + " |")
    for t in tiers:
        lines.append(f"| {t}: average JCT (h) | " + " | ".join(
            _fmt(r["jct_by_tier"].get(t), "h") for r in runs) + " |")
    return "\n".join(lines)


def write_report(path: Path, runs: list[dict[str, Any]]) -> None:
    first = runs[0]
    text = [
        f"# Simulation report: {first['trace']}",
        "",
        f"- trace: `{first['trace']}` ({first['format']}), {first['jobs']} jobs",
        f"- cluster: {first['gpus']} GPUs, {first['gpus_per_node']} per node",
        f"- tier rule: `{first['tier_rule']}` (seed {first['seed']}): {first['tier_rule_text']}",
        f"- policy: `{first['policy']}`",
        f"- job model: {json.dumps(first['constants'])}",
        "",
        comparison_table(runs),
        "",
    ]
    odd = [r["scheduler"] for r in runs[1:]
           if (r["trace"], r["gpus"], r["tier_rule"], r["seed"]) !=
           (first["trace"], first["gpus"], first["tier_rule"], first["seed"])]
    if odd:
        text.append(f"Warning: runs {', '.join(odd)} used another trace, size, tier rule or seed.")
    if any(r["scheduler"] in BOUNDS for r in runs):
        text.append("slurm-no-ckpt restarts preempted jobs from zero: a bound (the worst "
                    "case), not a baseline a site would run.")
    path.write_text("\n".join(text) + "\n", encoding="utf-8")


def write_plots(out: Path, engine: Engine, summary: dict[str, Any]) -> list[str]:
    """utilization.png, queue.png, account_share.png, jct_cdf.png; returns their names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    name = summary["scheduler"]
    t = np.array([s[0] for s in engine.samples]) / 86400
    made = []

    def save(fig, fname: str) -> None:
        fig.tight_layout()
        fig.savefig(out / fname, dpi=90)
        plt.close(fig)
        made.append(fname)

    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(t, [s[1] / engine.total_gpus for s in engine.samples], lw=0.8)
    ax.set(xlabel="day", ylabel="GPUs busy (share)", ylim=(0, 1.05),
           title=f"{name}: utilization over time")
    save(fig, "utilization.png")

    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(t, [s[2] for s in engine.samples], lw=0.8, color="tab:red")
    ax.set(xlabel="day", ylabel="jobs waiting", title=f"{name}: queue length over time")
    save(fig, "queue.png")

    totals: dict[str, float] = {}
    for s in engine.samples:
        for a, g in s[3].items():
            totals[a] = totals.get(a, 0) + g
    top = sorted(totals, key=lambda a: -totals[a])[:8]
    series = [[s[3].get(a, 0) / engine.total_gpus for s in engine.samples] for a in top]
    other = [sum(g for a, g in s[3].items() if a not in top) / engine.total_gpus
             for s in engine.samples]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.stackplot(t, *series, other, labels=top + ["other"], lw=0)
    ax.set(xlabel="day", ylabel="share of GPUs", ylim=(0, 1.05),
           title=f"{name}: GPU share per account")
    ax.legend(fontsize=6, loc="upper right", ncol=3)
    save(fig, "account_share.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for tier in ("premium", "standard", "basic"):
        jct = np.sort([j.end - j.submit for j in engine.done if j.tier.value == tier])
        if len(jct):
            ax.plot(jct / 3600, np.arange(1, len(jct) + 1) / len(jct), label=tier)
    ax.set(xscale="log", xlabel="JCT (hours, log)", ylabel="share of jobs",
           title=f"{name}: JCT CDF per tier")
    ax.legend()
    save(fig, "jct_cdf.png")
    return made
