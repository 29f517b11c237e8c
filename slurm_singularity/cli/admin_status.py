"""``singularity-admin status``: jobs with tier, account, D/W, GPU fraction
against the promise, state; GPUs per tier; pending reasons. Read from Slurm
through the same observation the daemon uses, so both see the same.

A running job's step, rate and ETA come from the runtime's ``progress.json``
in its checkpoint directory, found as ``job show`` finds it (a few Slurm
queries per running job)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .. import paths
from .admin_job import duration as _duration


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="jobs, tiers and GPUs as the scheduler sees them")
    p.add_argument("--policy", type=Path, default=paths.TEMPLATES_DIR / "policy.toml",
                   help="policy file (default templates/policy.toml)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)


def collect(policy_path: Path) -> dict:
    """The status as a dict (what ``--json`` prints).

    :raises PolicyError, SlurmError:
    """
    from ..policy.load import load_policy
    from ..sched.observe import observe
    from ..slurm.cli import CliSlurmClient

    policy = load_policy(policy_path)
    client = CliSlurmClient()
    now = time.time()
    obs = observe(client.jobs(), client.nodes(), policy, now)
    jobs = []
    per_tier = {t.value: 0 for t in policy.tiers}
    for st in obs.state.jobs:
        view = obs.views[st.job_id]
        promise = policy.tiers[st.tier].gpu_fraction
        fraction = st.gpu_fraction(now)
        per_tier[st.tier.value] = per_tier.get(st.tier.value, 0) + st.devices
        jobs.append({
            "job_id": st.job_id, "name": view.job.name, "tier": st.tier.value,
            "account": st.account, "devices": st.devices, "world_size": st.world_size,
            "elastic": [st.min_devices, st.max_devices], "state": st.phase.value,
            "gpu_fraction": round(fraction, 3), "promise": promise,
            "meets_promise": fraction >= promise,
            "reason": view.job.reason if st.phase.value == "pending" else "",
            "resizing_to": view.marks.resize_to,
            "progress": _progress(client, view.job, now) if st.phase.value == "running" else None,
        })
    return {"time": now, "total_gpus": obs.state.total_gpus, "free_gpus": obs.state.free_gpus,
            "gpus_per_tier": per_tier, "jobs": jobs}


def _progress(client, job, now: float) -> dict | None:
    """The running job's progress record (``job show``'s), or None."""
    from ..slurm.api import SlurmError
    from .admin_job import job_ckpt_dirs, progress_json, read_fresh_progress

    try:
        work_dir = client.show_job(job.job_id).get("WorkDir", "")
    except SlurmError:
        return None
    for where, _why in job_ckpt_dirs(client, job.job_id, work_dir):
        rec = read_fresh_progress(Path(where), job.start_time or None)
        if rec is not None:
            return progress_json(rec, now)
    return None


def _progress_text(p: dict | None) -> str:
    if p is None:
        return "-"
    total = "?" if p["total"] is None else p["total"]
    rate = "?" if not p["rate"] else f"{p['rate']:.3g}/s"
    eta = "?" if p["eta_s"] is None else _duration(p["eta_s"])
    return f"{p['step']}/{total} {rate} ETA {eta}"


def _status(args: argparse.Namespace) -> int:
    from ..policy.api import PolicyError
    from ..slurm.api import SlurmError

    try:
        data = collect(args.policy)
    except (PolicyError, SlurmError) as exc:
        print(f"singularity-admin status: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"GPUs: {data['total_gpus']} total, {data['free_gpus']} free; by tier: " +
          ", ".join(f"{t} {n}" for t, n in data["gpus_per_tier"].items()))
    header = f"{'JOBID':>7} {'TIER':<9} {'ACCOUNT':<10} {'D/W':>7} {'ELASTIC':>8} " \
             f"{'GPU-FRAC':>8} {'PROMISE':>7} {'STATE':<10} {'PROGRESS':<24} REASON"
    print(header)
    for j in data["jobs"]:
        mark = "" if j["meets_promise"] else " !"
        reason = j["reason"] or (f"resizing to {j['resizing_to']}" if j["resizing_to"] is not None else "")
        print(f"{j['job_id']:>7} {j['tier']:<9} {j['account'][:10]:<10} "
              f"{str(j['devices']) + '/' + str(j['world_size']):>7} "
              f"{'%d:%d' % tuple(j['elastic']):>8} {j['gpu_fraction']:>8.2f} "
              f"{j['promise']:>7.2f}{mark:<2}{j['state']:<10} {_progress_text(j['progress']):<24} "
              f"{reason}")
    return 0
