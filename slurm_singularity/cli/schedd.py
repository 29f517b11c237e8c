"""singularity-schedd: the scheduler-hook daemon (observe, plan, act)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="singularity-schedd",
        description="Grow elastic jobs into idle GPUs, shrink them instead of preempting, "
                    "and serve tiers and fairness by the policy.")
    p.add_argument("--policy", type=Path, default=None,
                   help="policy file (default: the one `singularity-admin policy apply` "
                        "installed, policy.toml beside $SLURM_CONF); refused unless it is the "
                        "policy that Slurm's installed job_submit.lua was generated from")
    p.add_argument("--period", type=float, default=2.0, help="seconds between passes (default 2)")
    p.add_argument("--gpus-per-node", type=int, default=8,
                   help="GPUs per node, to shape resized requests (default 8)")
    p.add_argument("--min-grace", type=float, default=30.0,
                   help="least seconds between the escalation steps of a job that does not "
                        "stop when signalled (signal, requeue, kill), for tiers whose "
                        "grace_time_s is shorter (default 30)")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus metrics on 127.0.0.1:PORT (default: off)")
    p.add_argument("--once", action="store_true", help="run one pass and exit")
    p.add_argument("--dry-run", action="store_true", help="log decisions, change nothing")
    p.add_argument("--journal", type=Path, default=None,
                   help="write-ahead journal of the daemon's signals, requeues and kills, "
                        "so that none is repeated after a crash of slurmctld or the daemon "
                        "(default: ~/.local/state/singularity-schedd/journal-<cluster>.jsonl, "
                        "one per slurm.conf)")
    p.add_argument("--no-journal", action="store_true",
                   help="run without the journal (then a slurmctld killed before it saved "
                        "the daemon's mark may see an action repeated)")
    p.add_argument("--federation", type=Path, default=None, metavar="STATE_DIR",
                   help="place the pending jobs of the local federation brought up in STATE_DIR "
                        "(`singularity-admin cluster up --federation`) across its clusters")
    p.add_argument("--copy-bandwidth", type=float, default=200.0, metavar="MB_PER_S",
                   help="with --federation: checkpoint copy bandwidth between clusters, "
                        "MB/s (default 200)")
    p.add_argument("--max-copy", type=float, default=60.0, metavar="SECONDS",
                   help="with --federation: longest checkpoint copy worth a move to another "
                        "cluster; 0 = never move (default 60)")
    p.add_argument("--min-run", type=float, default=600.0, metavar="SECONDS",
                   help="with --federation, under the policy's preemption = \"daemon\": a "
                        "running job that started less than this long ago is not moved to "
                        "another cluster to make room for a higher tier (default 600)")
    p.add_argument("--requeue-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="with --federation: seconds a job signalled for a move has to "
                        "checkpoint and be requeued before the move is given up (default 300)")
    p.add_argument("--pid-file", type=Path, default=None, help="write the daemon's pid here")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def default_journal() -> Path:
    """One journal per cluster: job ids of two clusters must not meet."""
    import hashlib

    from .. import contract
    conf = contract.slurm_conf() or "default"
    digest = hashlib.sha256(str(Path(conf).resolve()).encode()).hexdigest()[:12]
    return Path.home() / ".local" / "state" / "singularity-schedd" / f"journal-{digest}.jsonl"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..policy.api import PolicyError
    from ..policy.install import LivePolicy, installed_policy_path
    from ..sched.daemon import Daemon, DaemonSettings, install_signal_handlers
    from ..sched.executor import ExecutorSettings
    from ..slurm.cli import CliSlurmClient

    if args.federation is not None:
        return _run_placer(args)
    if args.policy is None:
        args.policy = installed_policy_path()
    try:
        live = LivePolicy(args.policy)
        policy = live.current()
        settings = DaemonSettings(
            period_s=args.period, metrics_port=args.metrics_port,
            max_passes=1 if args.once else 0,
            executor=ExecutorSettings(gpus_per_node=args.gpus_per_node, dry_run=args.dry_run,
                                      min_grace_s=args.min_grace),
            journal_path=None if args.no_journal or args.dry_run
            else (args.journal or default_journal()))
        daemon = Daemon(CliSlurmClient(), policy, settings, live_policy=live.current)
    except (PolicyError, ValueError) as exc:
        print(f"singularity-schedd: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"singularity-schedd: error: --journal: {exc}", file=sys.stderr)
        return 2
    if args.pid_file:
        args.pid_file.write_text(f"{os.getpid()}\n")
    install_signal_handlers(daemon)
    logging.getLogger(__name__).info("started (policy %s, period %g s, journal %s)", args.policy,
                                     args.period, settings.journal_path or "off")
    return daemon.run()


#: The placer's journal of migrations in flight, in the federation's state directory.
MIGRATIONS_FILE = "migrations.json"


def _run_placer(args: argparse.Namespace) -> int:
    """The federation mode: one placer for every member cluster."""
    from ..policy.api import PolicyError
    from ..policy.install import installed_policy_path
    from ..policy.load import load_policy
    from ..sched.fedmoves import MoveSettings
    from ..sched.federation import FederationPlacer, Member, MoveCost
    from ..slurm.cli import CliSlurmClient

    try:
        from ..cluster import federation
        from ..cluster.api import ClusterError
    except ImportError:
        print("singularity-schedd: error: --federation needs the local cluster harness "
              "(a source checkout)", file=sys.stderr)
        return 2
    try:
        moves = MoveSettings(min_run_s=args.min_run, requeue_timeout_s=args.requeue_timeout)
        fed = federation.load_spec(args.federation.absolute())
        # default: the policy `policy apply` installed on the first member
        policy = load_policy(args.policy or installed_policy_path(fed.member_specs()[0].conf_dir))
        members = [Member(spec.cluster_name, CliSlurmClient(spec.env()), spec.storage_root)
                   for spec in fed.member_specs()]
        placer = FederationPlacer(
            members, policy, period_s=args.period, dry_run=args.dry_run,
            journal_path=args.journal or args.federation.absolute() / MIGRATIONS_FILE,
            cost=MoveCost(bytes_per_s=args.copy_bandwidth * 1e6, max_copy_s=args.max_copy),
            # Slurm preempts in place unless the policy leaves preemption to
            # the daemons; then the placer moves running jobs to make room
            moves=moves if policy.elastic.preemption == "daemon" else None)
    except (PolicyError, ValueError, ClusterError) as exc:
        print(f"singularity-schedd: error: {exc}", file=sys.stderr)
        return 2
    if args.metrics_port:
        placer.metrics.serve(args.metrics_port)
    if args.pid_file:
        args.pid_file.write_text(f"{os.getpid()}\n")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: placer.stop(f"received {signal.Signals(s).name}"))
    logging.getLogger(__name__).info(
        "placing for federation %s (%s), period %g s; %s", fed.name,
        ", ".join(m.name for m in members), args.period,
        f"moves running jobs to make room for higher tiers (min run {args.min_run:g} s)"
        if placer.moves else "moves only jobs Slurm requeued (the policy's preemption is "
                             f"{policy.elastic.preemption!r}: Slurm preempts in place)")
    return placer.run(max_passes=1 if args.once else 0)


if __name__ == "__main__":
    sys.exit(main())
