"""What a simulation run measured: summary.json's fields.

Definitions (docs/simulator.md repeats them):

- JCT: completion - submission; queue time: first start - submission.
  Services (Alibaba pods still running at the end of the trace) are
  simulated but left out of every metric but ``services`` (their count).
- GPU fraction of a finished job: its run time at full size / its JCT; a tier's
  SLA attainment is the share of its jobs whose GPU fraction met the tier's
  ``gpu_fraction`` in the policy (the same promise for every scheduler).
- utilization: GPU-seconds held by jobs / (GPUs x time from the first
  submission to the last completion).
- sla_attainment_gpu_hours: the same, each job weighted by its GPU-hours
  (run time at full size x W); sla_attainment_long_jobs: the same over jobs
  of at least ``LONG_JOB_S`` run time (for a job of a minute, the seconds of
  a scheduling period and a victim's checkpoint decide the 95% alone).
- lost_gpu_hours: GPU time of work thrown away by preemptions that kill a
  job (it restarts from its last checkpoint, or from zero without one);
  overhead_gpu_hours: GPU time held without progress: checkpoints, hand-over,
  restart latency and restores, and waits for GPUs a victim still holds.
- preemptions_p99, preemptions_max: per job.
- jain_fairness: Jain's index over accounts of their jobs' mean GPU fraction
  (1.0 = every account's jobs get the same share of their ideal speed).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...policy.api import Policy, Tier
from .engine import Engine, SimJob

#: Run time from which a job counts in ``sla_attainment_long_jobs``, seconds.
LONG_JOB_S = 600.0


def jain(values: list[float]) -> float:
    """Jain's fairness index: (sum x)^2 / (n * sum x^2); 1.0 for an empty or all-zero list."""
    if not values:
        return 1.0
    s, sq = sum(values), sum(v * v for v in values)
    return (s * s) / (len(values) * sq) if sq > 0 else 1.0


def summarize(engine: Engine, policy: Policy) -> dict[str, Any]:
    done: list[SimJob] = [j for j in engine.done if not j.service]
    services = len(engine.done) - len(done)
    if not done:
        raise ValueError("no job finished")
    jct = np.array([j.end - j.submit for j in done])
    queue = np.array([(j.first_start if j.first_start is not None else j.end) - j.submit
                      for j in done])
    frac = np.array([j.work_total / (j.end - j.submit) if j.end > j.submit else 1.0 for j in done])
    first = min(j.submit for j in done)
    last = max(j.end for j in done)
    span = max(last - first, 1e-9)
    gpu_h = np.array([j.work_total * j.world_size for j in done])
    preempt = np.array([j.preemptions for j in done])
    by_tier: dict[str, Any] = {}
    sla: dict[str, float] = {}
    sla_weighted: dict[str, float] = {}
    sla_long: dict[str, float] = {}
    long = np.array([j.work_total >= LONG_JOB_S for j in done])
    counts: dict[str, int] = {}
    for t in Tier:
        idx = [k for k, j in enumerate(done) if j.tier is t]
        if not idx:
            continue
        promise = policy.tiers[t].gpu_fraction if t in policy.tiers else 0.0
        by_tier[t.value] = float(jct[idx].mean())
        sla[t.value] = float(np.mean(frac[idx] >= promise - 1e-9))
        met = frac[idx] >= promise - 1e-9
        sla_weighted[t.value] = float(gpu_h[idx][met].sum() / max(gpu_h[idx].sum(), 1e-9))
        if long[idx].any():
            sla_long[t.value] = float(np.mean(met[long[idx]]))
        counts[t.value] = len(idx)
    per_account: dict[str, list[float]] = {}
    jct_account: dict[str, list[float]] = {}
    for j, f, c in zip(done, frac, jct):
        per_account.setdefault(j.account, []).append(float(f))
        jct_account.setdefault(j.account, []).append(float(c))
    return {
        "jobs": len(done),
        "services": services,
        "avg_jct_s": float(jct.mean()),
        "p50_jct_s": float(np.percentile(jct, 50)),
        "p99_jct_s": float(np.percentile(jct, 99)),
        "avg_queue_s": float(queue.mean()),
        "utilization": float(engine.busy_gpu_s / (engine.total_gpus * span)),
        "makespan_s": float(span),
        "lost_gpu_hours": float(sum(j.lost_gpu_s for j in done) / 3600),
        "overhead_gpu_hours": float(sum(j.overhead_gpu_s for j in done) / 3600),
        "preemptions": int(preempt.sum()),
        "preemptions_p99": float(np.percentile(preempt, 99)),
        "preemptions_max": int(preempt.max()),
        "resizes": int(sum(j.resizes for j in done)),
        "sla_attainment": sla,
        "sla_attainment_gpu_hours": sla_weighted,
        "sla_attainment_long_jobs": sla_long,
        "jct_by_tier": by_tier,
        "jobs_by_tier": counts,
        "jain_fairness": jain([sum(v) / len(v) for v in per_account.values()]),
        "accounts": len(per_account),
        "jct_by_account": {a: sum(v) / len(v) for a, v in sorted(jct_account.items())},
        "gpu_fraction_by_account": {a: sum(v) / len(v) for a, v in sorted(per_account.items())},
    }
