"""``singularity-admin policy check|apply`` and ``singularity-admin job
explain``: validate a policy file, install it into a running Slurm, and say
what it will do with a submission.

``apply`` is all-or-nothing: the file is validated and rendered before
anything is written; the two files are written to temporary names, fsynced
and renamed; if ``scontrol reconfigure`` then fails, the previous files are
put back and Slurm is reconfigured again, so a rejected policy leaves the
cluster as it was.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

from .. import contract
from ..policy import default_policy_path
from ..policy.api import Policy, PolicyError
from ..policy.install import install, installed_policy_path, restore
from ..policy.load import load_policy
from ..policy.render import UNIT_NAME, associations, render_policy_files, render_unit
from ..policy.rules import Decision, decide
from ..policy.sbatch_args import parse_sbatch_args

log = logging.getLogger(__name__)



def register(sub: argparse._SubParsersAction) -> None:
    policy = sub.add_parser("policy", help="check and install the policy file")
    psub = policy.add_subparsers(dest="action", metavar="ACTION")
    psub.required = True
    check = psub.add_parser("check", help="validate a policy file and summarize it")
    check.add_argument("file", type=Path, help="policy file (TOML)")
    check.set_defaults(func=_check)
    apply = psub.add_parser(
        "apply", help="validate, install the policy with the policy.conf and job_submit.lua "
                      "rendered from it next to slurm.conf, scontrol reconfigure, install the "
                      "daemon's systemd unit")
    apply.add_argument("file", type=Path, help="policy file (TOML)")
    apply.add_argument("--conf-dir", type=Path, default=None,
                       help="Slurm's configuration directory (default: that of $SLURM_CONF)")
    apply.add_argument("--nodes", default=None,
                       help="node list of the partitions (default: the NodeName entries "
                            "of slurm.conf in the conf dir)")
    apply.add_argument("--no-reconfigure", action="store_true",
                       help="only write the files")
    apply.add_argument("--unit-dir", type=Path, default=None,
                       help=f"where to install the daemon's systemd unit {UNIT_NAME} (default: "
                            "the conf dir; `systemctl link` it, or give /etc/systemd/system)")
    apply.set_defaults(func=_apply)

    add_explain_parser(job_group(sub))


def job_group(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The subcommands of ``singularity-admin job``, created on first use.

    Several modules add ``job`` subcommands (this one adds ``explain``);
    argparse refuses a second ``add_parser("job")``, so each of them must get
    the group through this function."""
    existing = sub.choices.get("job")
    if existing is not None:
        return existing._singularity_job_actions  # type: ignore[attr-defined]
    job = sub.add_parser("job", help="jobs as the policy and the scheduler see them")
    actions = job.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    job._singularity_job_actions = actions  # type: ignore[attr-defined]
    return actions


def add_explain_parser(jsub: argparse._SubParsersAction) -> None:
    """Add ``explain`` to the ``job`` group."""
    explain = jsub.add_parser(
        "explain", help="what the policy does with a submission, by the rules of job_submit.lua",
        description="Give sbatch options (and optionally a batch script, whose #SBATCH lines "
                    "are read); prints tier, partition, requeue, signal, elastic range and "
                    "world size, or the message sbatch would print. Exit 1 if rejected.")
    explain.add_argument("--policy", type=Path, default=None,
                         help="policy file (default: the one `policy apply` installed beside "
                              "$SLURM_CONF, else the packaged templates/policy.toml)")
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    explain.add_argument("sbatch_args", nargs="*", metavar="SBATCH_OPTION",
                         help="sbatch options, e.g. --sla=basic --elastic=2:8 --gres=gpu:8")
    explain.set_defaults(func=_explain)
    # sbatch options look like options; argparse would refuse them.
    explain.__class__ = _PassThroughParser


class _PassThroughParser(argparse.ArgumentParser):
    """Keeps its own options (--policy, --json, --help) and hands every
    other argument, in order, to ``sbatch_args``."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        own: list[str] = []
        rest: list[str] = []
        items = list(args or [])
        i = 0
        while i < len(items):
            arg = items[i]
            if arg in ("-h", "--help", "--json") or arg.startswith("--policy="):
                own.append(arg)
            elif arg == "--policy" and i + 1 < len(items):
                own.extend(items[i:i + 2])
                i += 1
            elif arg == "--":
                rest.extend(items[i + 1:])
                break
            else:
                rest.append(arg)
            i += 1
        ns, extra = super().parse_known_args(own, namespace)
        ns.sbatch_args = rest
        return ns, extra


def _error(group: str, message: object) -> int:
    print(f"singularity-admin {group}: error: {message}", file=sys.stderr)
    return 1


# -- check -------------------------------------------------------------------

def summary(policy: Policy) -> str:
    """Human summary of a policy: tiers, accounts, defaults."""
    lines = ["tiers:"]
    for spec in sorted(policy.tiers.values(), key=lambda s: -s.tier.rank):
        by = ", ".join(t.value for t in spec.preemptible_by) or "nobody"
        lines.append(
            f"  {spec.tier.value:<9} partition={spec.partition} priority_tier="
            f"{spec.priority_tier} preempt={spec.preempt_mode.value} "
            f"grace={spec.grace_time_s}s signal={spec.signal} "
            f"gpu_fraction>={spec.gpu_fraction:g} preemptible_by={by}")
    lines.append("accounts:")
    for name, acc in sorted(policy.accounts.items()):
        quota = acc.gpu_quota if acc.gpu_quota is not None else "none"
        lines.append(f"  {name:<12} tiers={','.join(t.value for t in acc.tiers)} "
                     f"gpu_quota={quota} fair_share_weight={acc.fair_share_weight:g} "
                     f"members={','.join(acc.members) or '(associations)'}")
    lines.append(f"defaults: tier={policy.defaults.tier.value} "
                 f"account={policy.defaults.account or '(none: --account required)'}")
    lines.append(f"elastic: world_size_multiple_of_devices="
                 f"{str(policy.elastic.world_size_multiple_of_devices).lower()} "
                 f"max_splice_factor={policy.elastic.max_splice_factor}")
    return "\n".join(lines)


def _check(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.file)
    except PolicyError as exc:
        return _error("policy check", exc)
    print(f"{args.file}: valid")
    print(summary(policy))
    return 0


# -- apply -------------------------------------------------------------------

_NODENAME = re.compile(r"^\s*NodeName=(\S+)", re.IGNORECASE)


def nodes_of_slurm_conf(text: str) -> str | None:
    """The node list of every ``NodeName=`` line (DEFAULT excluded), comma-joined."""
    names = [m.group(1) for line in text.splitlines()
             if (m := _NODENAME.match(line)) and m.group(1).upper() != "DEFAULT"]
    return ",".join(names) or None


def _apply(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.file)
    except PolicyError as exc:
        return _error("policy apply", f"{exc}\nnothing was changed")
    conf_dir = args.conf_dir
    if conf_dir is None:
        conf = contract.slurm_conf()
        if conf is None:
            return _error("policy apply", "no --conf-dir and $SLURM_CONF is not set")
        conf_dir = Path(conf).parent
    slurm_conf = conf_dir / "slurm.conf"
    nodes = args.nodes
    if nodes is None:
        try:
            nodes = nodes_of_slurm_conf(slurm_conf.read_text(encoding="utf-8"))
        except OSError as exc:
            return _error("policy apply", f"cannot read {slurm_conf}: {exc.strerror}; "
                                          "give --nodes")
        if nodes is None:
            return _error("policy apply", f"{slurm_conf} has no NodeName line; give --nodes")
    files = render_policy_files(policy, nodes, source=str(args.file))
    unit_dir = args.unit_dir or conf_dir
    unit = render_unit(Path(sys.prefix), slurm_conf, installed_policy_path(conf_dir))
    try:
        previous = install(files, conf_dir)
    except OSError as exc:
        return _error("policy apply", f"cannot write into {conf_dir}: {exc}")
    print(f"installed {', '.join(files)} into {conf_dir} (policy sha256 {policy.sha256})")
    if not args.no_reconfigure:
        rc = _reconfigure(policy, slurm_conf, previous, conf_dir)
        if rc:
            return rc
    try:
        install({UNIT_NAME: unit}, unit_dir)
    except OSError as exc:
        return _error("policy apply", f"cannot write {unit_dir / UNIT_NAME}: {exc}")
    print(f"installed {unit_dir / UNIT_NAME} (singularity-schedd on "
          f"{installed_policy_path(conf_dir)})")
    return 0


def _reconfigure(policy: Policy, slurm_conf: Path, previous: dict[str, str | None],
                 conf_dir: Path) -> int:
    """``scontrol reconfigure``; on failure put ``previous`` back. Then the
    policy's accounts in slurmdbd. Returns the exit status."""
    from ..slurm.api import SlurmError
    from ..slurm.cli import CliSlurmClient

    env = {"SLURM_CONF": str(slurm_conf)}
    client = CliSlurmClient(env)
    try:
        client.scontrol("reconfigure")
    except SlurmError as exc:
        restore(previous, conf_dir)
        try:
            client.scontrol("reconfigure")
        except SlurmError:
            log.warning("reconfigure with the previous files failed too")
        return _error("policy apply", f"scontrol reconfigure failed: {exc}\n"
                                      "the previous files were put back")
    print("scontrol reconfigure: done")
    try:
        if client.accounting_enabled():
            changed = client.ensure_accounts(*associations(policy, [getpass.getuser()]))
            print(f"slurmdbd accounts {', '.join(sorted(policy.accounts))} "
                  f"(associations, GrpTRES gres/gpu = gpu_quota): "
                  + (f"updated {', '.join(changed)}" if changed else "already there"))
    except SlurmError as exc:
        print(f"policy apply: warning: could not create the policy's accounts, members and "
              f"GPU limits in slurmdbd ({exc}); with AccountingStorageEnforce a user without "
              f"an association cannot use the account", file=sys.stderr)
    return 0


# -- job explain -------------------------------------------------------------

def explain_text(decision: Decision) -> str:
    lo, hi = decision.elastic
    counts = ", ".join(str(d) for d in decision.device_counts)
    return "\n".join([
        f"accepted: tier {decision.tier.value} (account {decision.account})",
        f"  partition       {decision.partition}",
        f"  requeue         {'yes' if decision.requeue else 'no'}",
        f"  preemptible     {'yes' if decision.preemptible else 'no'}"
        + (f" (SIGTERM, SIGKILL after {decision.grace_time_s} s)"
           if decision.preemptible else ""),
        f"  signal          {decision.signal} ({contract.PREEMPT_SIGNAL})",
        f"  GPUs requested  {decision.gpus}",
        f"  elastic         {lo}:{hi} devices" + ("" if lo < hi else " (not elastic)"),
        f"  world size      {decision.world_size} (runs on D = {counts})",
        f"  AdminComment    {decision.tag}",
    ])


def unprotected_warning(decision: Decision, argv: list[str], script: str | None) -> list[str]:
    """A preemptible job whose script (or --wrap command) does not run
    singularity-run keeps none of its work when preempted: say so."""
    if not decision.preemptible:
        return []
    wrap = None
    for i, a in enumerate(argv):
        if a.startswith("--wrap="):
            wrap = a.split("=", 1)[1]
        elif a == "--wrap" and i + 1 < len(argv):
            wrap = argv[i + 1]
    command = script if script is not None else wrap
    if command is None:
        return ["no script given: only a job that runs `srun singularity-run ...` keeps its "
                "work when preempted"]
    if "singularity-run" in command:
        return []
    return [f"the job does not run singularity-run: when the {decision.tier.value} tier is "
            f"preempted Slurm requeues it and it starts again from the top, so its work is "
            f"not protected (see docs/user-guide.md)"]


def _explain_default() -> Path:
    """The installed policy where there is one (a login node that shares
    the controller's Slurm configuration), else the packaged default."""
    installed = installed_policy_path()
    return installed if installed.is_file() else default_policy_path()


def _explain(args: argparse.Namespace) -> int:
    from slurm_singularity.transparent.api import EXPLAIN_LINE, transparent_requested

    argv = list(args.sbatch_args)
    script = None
    if argv and not argv[-1].startswith("-") and Path(argv[-1]).is_file():
        try:
            script = Path(argv[-1]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return _error("job explain", f"cannot read {argv[-1]}: {exc}")
        argv = argv[:-1]
    try:
        policy = load_policy(args.policy or _explain_default())
        sub, ignored = parse_sbatch_args(argv, script)
    except PolicyError as exc:   # SbatchArgsError is one
        return _error("job explain", exc)
    if ignored:
        print(f"job explain: ignored (not looked at by the policy): {' '.join(ignored)}",
              file=sys.stderr)
    # the caller's own login: an account's members bind it as in sbatch
    result = decide(policy, replace(sub, user=getpass.getuser()))
    if isinstance(result, Decision):
        transparent = transparent_requested(argv, script)
        warnings = [] if transparent else unprotected_warning(result, argv, script)
        if args.json:
            print(json.dumps({"accepted": True, "tier": result.tier.value,
                              "account": result.account, "partition": result.partition,
                              "requeue": result.requeue, "preemptible": result.preemptible,
                              "signal": result.signal, "grace_time_s": result.grace_time_s,
                              "gpus": result.gpus, "elastic": list(result.elastic),
                              "world_size": result.world_size, "tag": result.tag,
                              "env": result.env, "warnings": warnings,
                              "transparent": transparent}))
        else:
            print(explain_text(result))
            if transparent:
                print(f"  transparent     {EXPLAIN_LINE}")
            for w in warnings:
                print(f"warning: {w}")
        return 0
    if args.json:
        print(json.dumps({"accepted": False, "option": result.option,
                          "message": result.message}))
    else:
        print(f"rejected: {result.message}")
    return 1
