"""``singularity-admin status``: jobs with tier, account, D/W, GPU fraction
against the promise, state; GPUs per tier; pending reasons. Read from Slurm
through the same observation the daemon uses, so both see the same. With
``--federation STATE_DIR``, the same for every cluster of a local federation,
each job under the cluster where it runs (or, pending, its origin).

A transparent job (``--transparent``, docs/transparent.md) is marked in the
MODE column: job_submit.lua wrote ``transparent=1`` into its tag, which
only root can change, so the mark is the job's real mode.

A running job's step, rate and ETA come from the runtime's ``progress.json``
in its checkpoint directory, found as ``job show`` finds it (a few Slurm
queries per running job)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .admin_job import duration as _duration


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="jobs, tiers and GPUs as the scheduler sees them")
    p.add_argument("--policy", type=Path, default=None,
                   help="policy file (default: the one `singularity-admin policy apply` "
                        "installed, policy.toml beside $SLURM_CONF)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--federation", type=Path, default=None, metavar="STATE_DIR",
                   help="every cluster of the local federation in STATE_DIR "
                        "(`singularity-admin cluster up --federation`)")
    p.set_defaults(func=_status)


def collect(policy_path: Path | None, client=None, *, show_pending=None) -> dict:
    """The status as a dict (what ``--json`` prints), of the cluster
    ``client`` talks to (default: ``$SLURM_CONF``'s). ``show_pending(job)``
    false leaves a pending job out (a federation member's copy of a job
    another member is the origin of); None shows every one. ``policy_path``
    None: the installed policy.

    :raises PolicyError, SlurmError:
    """
    from ..policy.install import installed_policy_path
    from ..policy.load import load_policy
    from ..sched.observe import observe
    from ..slurm.cli import CliSlurmClient

    policy = load_policy(policy_path or installed_policy_path())
    client = client or CliSlurmClient()
    now = time.time()
    obs = observe(client.jobs(), client.nodes(), policy, now)
    jobs = []
    per_tier = {t.value: 0 for t in policy.tiers}
    for st in obs.state.jobs:
        view = obs.views[st.job_id]
        if st.phase.value in ("pending", "held") and show_pending is not None and \
                not show_pending(view.job):
            continue
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
            "transparent": _transparent(view.marks.tag),
            "progress": _progress(client, view.job, now) if st.phase.value == "running" else None,
        })
    return {"time": now, "total_gpus": obs.state.total_gpus, "free_gpus": obs.state.free_gpus,
            "gpus_per_tier": per_tier, "jobs": jobs}


def collect_federation(policy_path: Path | None, state_dir: Path) -> dict:
    """Cluster name -> ``collect`` of that member; a pending job is shown
    once, under its origin cluster.

    :raises PolicyError, SlurmError, ClusterError:
    """
    from ..cluster import federation
    from ..policy.install import installed_policy_path
    from ..slurm.cli import CliSlurmClient

    fed = federation.load_spec(state_dir)
    out = {}
    for spec in fed.member_specs():
        name = spec.cluster_name
        out[name] = collect(policy_path or installed_policy_path(spec.conf_dir),
                            CliSlurmClient(spec.env()),
                            show_pending=lambda job, n=name: (job.federation_origin or n) == n)
    from ..sched.migrate import MigrationJournal
    from .schedd import MIGRATIONS_FILE

    moving = MigrationJournal(state_dir / MIGRATIONS_FILE).load()
    return {"federation": fed.name, "clusters": out,
            "migrations": [{"job_id": m.job_id, "from": m.source, "to": m.destination,
                            "step": m.step.value, "since": m.since}
                           for m in moving.values()]}


def _transparent(tag: str) -> bool:
    """Whether the job tag (without the daemon's marks) marks the job
    transparent; a tag that does not parse marks nothing."""
    from .. import contract
    from ..transparent.api import tagged_transparent

    try:
        parsed = contract.parse_job_tag(tag)
    except contract.ContractError:
        return False
    return parsed is not None and tagged_transparent(dict(parsed.extra))


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

    errors: tuple[type[Exception], ...] = (PolicyError, SlurmError)
    try:
        if args.federation is not None:
            from ..cluster.api import ClusterError
            from ..sched.migrate import MigrationError
            errors += (ClusterError, MigrationError)
            data = collect_federation(args.policy, args.federation.absolute())
        else:
            data = collect(args.policy)
    except errors as exc:
        print(f"singularity-admin status: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    if args.federation is not None:
        print(f"Federation {data['federation']}: {len(data['clusters'])} clusters, "
              f"{len(data['migrations'])} migration(s) in flight")
        for m in data["migrations"]:
            print(f"  job {m['job_id']}: {m['from']} -> {m['to']}, {m['step']}")
        for name, one in data["clusters"].items():
            print(f"\n== cluster {name} ==")
            _print(one)
        return 0
    _print(data)
    return 0


def _print(data: dict) -> None:
    print(f"GPUs: {data['total_gpus']} total, {data['free_gpus']} free; by tier: " +
          ", ".join(f"{t} {n}" for t, n in data["gpus_per_tier"].items()))
    header = f"{'JOBID':>7} {'TIER':<9} {'ACCOUNT':<10} {'D/W':>7} {'ELASTIC':>8} " \
             f"{'GPU-FRAC':>8} {'PROMISE':>7} {'STATE':<10} {'MODE':<11} {'PROGRESS':<24} " \
             "REASON"
    print(header)
    for j in data["jobs"]:
        mark = "" if j["meets_promise"] else " !"
        reason = j["reason"] or (f"resizing to {j['resizing_to']}" if j["resizing_to"] is not None else "")
        print(f"{j['job_id']:>7} {j['tier']:<9} {j['account'][:10]:<10} "
              f"{str(j['devices']) + '/' + str(j['world_size']):>7} "
              f"{'%d:%d' % tuple(j['elastic']):>8} {j['gpu_fraction']:>8.2f} "
              f"{j['promise']:>7.2f}{mark:<2}{j['state']:<10} "
              f"{'transparent' if j.get('transparent') else '-':<11} "
              f"{_progress_text(j['progress']):<24} "
              f"{reason}")
