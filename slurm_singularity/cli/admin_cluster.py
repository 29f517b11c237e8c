"""``singularity-admin cluster up|down|status|env``: the local cluster."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from .. import contract, paths
from ..cluster.api import ClusterError, ClusterSpec


def _default_state_dir() -> Path:
    return Path(contract.state_dir() or paths.DEFAULT_STATE_DIR)


def register(sub: argparse._SubParsersAction) -> None:
    cluster = sub.add_parser("cluster", help="a real Slurm cluster on this machine")
    csub = cluster.add_subparsers(dest="action", metavar="ACTION")
    csub.required = True

    def with_state_dir(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--state-dir", type=Path, default=None,
                       help=f"state directory (default: ${contract.STATE_DIR} or "
                            f"{paths.DEFAULT_STATE_DIR})")
        return p

    up = with_state_dir(csub.add_parser("up", help="start munged, slurmctld and the slurmd"))
    up.add_argument("--nodes", type=int, default=4, help="number of nodes (default 4)")
    up.add_argument("--gpus-per-node", type=int, default=8, help="emulated GPUs per node (default 8)")
    up.add_argument("--cpus-per-node", type=int, default=16, help="CPUs each node claims (default 16)")
    up.add_argument("--ctld-port", type=int, default=16817, help="slurmctld port (default 16817)")
    up.add_argument("--slurmd-port", type=int, default=17001,
                    help="port of n1's slurmd; node i uses this + i - 1 (default 17001)")
    up.add_argument("--dbd-port", type=int, default=0,
                    help="slurmdbd port (default: --ctld-port - 1)")
    up.add_argument("--mysql-port", type=int, default=0,
                    help="port of the cluster's private MariaDB (default: --ctld-port - 2)")
    up.add_argument("--no-accounting", action="store_true",
                    help="run without slurmdbd (sacct will not work)")
    up.add_argument("--name", default="singularity", help="Slurm ClusterName (default singularity)")
    up.add_argument("--policy", type=Path, default=None,
                    help="policy file (default templates/policy.toml)")
    up.add_argument("--federation", metavar="NAME", default=None,
                    help="bring up a Slurm federation NAME of the --clusters instead, sharing "
                         "one slurmdbd; member i's slurmctld on --ctld-port + 100 i")
    up.add_argument("--clusters", metavar="NAME:NODESxGPUS,...", default=None,
                    help="with --federation: its member clusters, e.g. east:2x8,west:2x8")
    up.set_defaults(func=_up)

    down = with_state_dir(csub.add_parser("down", help="stop the daemons that `up` started"))
    down.set_defaults(func=_down)
    st = with_state_dir(csub.add_parser("status", help="daemons and nodes"))
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_status)
    mig = with_state_dir(csub.add_parser(
        "migrate", help="in a federation: move a running job to another cluster"))
    mig.add_argument("job_id", type=int, help="the running job")
    mig.add_argument("--to", required=True, metavar="NAME", help="the destination cluster")
    mig.add_argument("--ckpt", required=True, type=Path, metavar="RELATIVE",
                     help="the job's checkpoint directory relative to its cluster's storage "
                          "root (STATE_DIR/NAME/storage)")
    mig.add_argument("--timeout", type=float, default=120.0,
                     help="seconds to wait for its checkpoint and requeue (default 120)")
    mig.add_argument("--policy", type=Path, default=None,
                     help="policy file, for the tier's signal (default templates/policy.toml)")
    mig.set_defaults(func=_migrate)
    env = with_state_dir(csub.add_parser("env", help="print `export SLURM_CONF=...` for eval"))
    env.add_argument("--cluster", metavar="NAME", default=None,
                     help="in a federation: the member to point at (default: the first)")
    env.set_defaults(func=_env)


def _progress(msg: str) -> None:
    print(f"cluster: {msg}", file=sys.stderr, flush=True)


def _fail(exc: Exception) -> int:
    print(f"singularity-admin cluster: error: {exc}", file=sys.stderr)
    return 1


def _up(args: argparse.Namespace) -> int:
    from ..cluster import local
    from ..policy.api import PolicyError
    from ..policy.load import load_policy

    if args.federation is not None or args.clusters is not None:
        return _up_federation(args)
    try:
        spec = ClusterSpec(
            state_dir=(args.state_dir or _default_state_dir()).absolute(),
            nodes=args.nodes, gpus_per_node=args.gpus_per_node,
            cpus_per_node=args.cpus_per_node, ctld_port=args.ctld_port,
            slurmd_base_port=args.slurmd_port, cluster_name=args.name,
            accounting=not args.no_accounting, dbd_port=args.dbd_port,
            mysql_port=args.mysql_port)
        policy = load_policy(args.policy or paths.TEMPLATES_DIR / "policy.toml")
        st = local.up(spec, policy, progress=_progress)
    except (ValueError, ClusterError, PolicyError) as exc:
        return _fail(exc)
    idle = sum(1 for n in st.nodes if n.state == "idle")
    print(f"Local Slurm cluster up: {len(st.nodes)} nodes ({idle} idle), "
          f"{spec.gpus_per_node} GPUs each, slurmctld on port {spec.ctld_port}.")
    print("Use it from a shell with:")
    print(f"  eval $(singularity-admin cluster env --state-dir {shlex.quote(str(spec.state_dir))})")
    print("  sinfo; sbatch --gres=gpu:2 --wrap 'echo $CUDA_VISIBLE_DEVICES'")
    print(f"Stop it with: singularity-admin cluster down --state-dir {shlex.quote(str(spec.state_dir))}")
    return 0


def _up_federation(args: argparse.Namespace) -> int:
    from ..cluster import federation
    from ..policy.api import PolicyError
    from ..policy.load import load_policy

    try:
        if args.federation is None:
            raise ValueError("--clusters needs --federation NAME")
        if args.clusters is None:
            raise ValueError("--federation needs --clusters NAME:NODESxGPUS,... "
                             "(for example east:2x8,west:2x8)")
        spec = federation.FederationSpec(
            name=args.federation, state_dir=(args.state_dir or _default_state_dir()).absolute(),
            members=federation.parse_members(args.clusters), base_port=args.ctld_port)
        policy = load_policy(args.policy or paths.TEMPLATES_DIR / "policy.toml")
        statuses = federation.up(spec, policy, progress=_progress)
    except (ValueError, ClusterError, PolicyError) as exc:
        return _fail(exc)
    sd = shlex.quote(str(spec.state_dir))
    print(f"Local Slurm federation {spec.name} up:")
    for member, st in zip(spec.member_specs(), statuses.values()):
        idle = sum(1 for n in st.nodes if n.state == "idle")
        print(f"  {member.cluster_name}: {len(st.nodes)} nodes ({idle} idle), "
              f"{member.gpus_per_node} GPUs each, slurmctld on port {member.ctld_port}")
    print("Use a member from a shell with:")
    print(f"  eval $(singularity-admin cluster env --state-dir {sd} "
          f"--cluster {spec.members[0].name})")
    print("  sbatch --gres=gpu:2 --wrap hostname; squeue --federation")
    print(f"Stop it with: singularity-admin cluster down --state-dir {sd}")
    return 0


def _down(args: argparse.Namespace) -> int:
    from ..cluster import federation, local

    state_dir = (args.state_dir or _default_state_dir()).absolute()
    if federation.is_federation(state_dir):
        try:
            stopped = federation.down(state_dir, progress=_progress)
        except ClusterError as exc:
            return _fail(exc)
    else:
        stopped = local.down(state_dir, progress=_progress)
    print(f"stopped {len(stopped)} daemon(s)" if stopped else "nothing was running")
    return 0


def _status(args: argparse.Namespace) -> int:
    from ..cluster import federation, local

    state_dir = (args.state_dir or _default_state_dir()).absolute()
    try:
        if federation.is_federation(state_dir):
            return _federation_status(federation.status(state_dir), args.json)
        st = local.status(state_dir)
    except ClusterError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps({"daemons": st.daemons,
                          "nodes": [n.__dict__ for n in st.nodes]}, indent=2))
        return 0 if st.running else 3
    if not st.running:
        print(f"cluster in {st.spec_file.parent}: not running")
    for name, pid in st.daemons.items():
        print(f"{name:<12} {'pid ' + str(pid) if pid else 'not running'}")
    for node in st.nodes:
        print(f"{node.name:<12} {node.state:<10} gpu:{node.gpus}")
    return 0 if st.running else 3


def _migrate(args: argparse.Namespace) -> int:
    from ..cluster import federation
    from ..policy.api import PolicyError
    from ..policy.load import load_policy
    from ..sched.federation import Member
    from ..sched.migrate import MigrationError, migrate
    from ..sched.observe import observe
    from ..slurm.api import SlurmError
    from ..slurm.cli import CliSlurmClient

    state_dir = (args.state_dir or _default_state_dir()).absolute()
    try:
        if args.ckpt.is_absolute() or ".." in args.ckpt.parts:
            raise ValueError(f"--ckpt {args.ckpt} must be relative to the storage root, "
                             f"without '..'")
        policy = load_policy(args.policy or paths.TEMPLATES_DIR / "policy.toml")
        fed = federation.load_spec(state_dir)
        members = {m.cluster_name: Member(m.cluster_name, CliSlurmClient(m.env()),
                                          m.storage_root) for m in fed.member_specs()}
        destination = members.get(args.to) or fed.member(args.to)
        source = None
        for member in members.values():
            obs = observe(member.client.jobs(), member.client.nodes(), policy, 0.0)
            st = next((j for j in obs.state.jobs if j.job_id == args.job_id and j.devices), None)
            if st is not None:
                source, tier = member, st.tier
        if source is None:
            raise ValueError(f"job {args.job_id} runs on no cluster of federation {fed.name}")
        if source.name == args.to:
            raise ValueError(f"--to {args.to}: job {args.job_id} already runs there")
        report = migrate(args.job_id, source, destination, args.ckpt, policy.tiers[tier].signal,
                         timeout_s=args.timeout, progress=_progress)
    except (ValueError, ClusterError, PolicyError, MigrationError, SlurmError) as exc:
        return _fail(exc)
    print(f"job {report.job_id} moved {report.source} -> {report.destination} in "
          f"{report.seconds:.1f} s ({report.files} checkpoint files, {report.bytes} bytes)")
    return 0


def _federation_status(statuses: dict, as_json: bool) -> int:
    running = any(st.running for st in statuses.values())
    if as_json:
        print(json.dumps({name: {"daemons": st.daemons, "nodes": [n.__dict__ for n in st.nodes]}
                          for name, st in statuses.items()}, indent=2))
        return 0 if running else 3
    for name, st in statuses.items():
        print(f"cluster {name}: {'running' if st.running else 'not running'}")
        for daemon, pid in st.daemons.items():
            print(f"  {daemon:<12} {'pid ' + str(pid) if pid else 'not running'}")
        for node in st.nodes:
            print(f"  {node.name:<12} {node.state:<10} gpu:{node.gpus}")
    return 0 if running else 3


def _env(args: argparse.Namespace) -> int:
    from ..cluster import federation, local

    state_dir = (args.state_dir or _default_state_dir()).absolute()
    try:
        if federation.is_federation(state_dir):
            fed = federation.load_spec(state_dir)
            spec = fed.member(args.cluster or fed.members[0].name)
        elif args.cluster is not None:
            raise ClusterError(f"--cluster {args.cluster!r}: {state_dir} holds one cluster, "
                               f"not a federation")
        else:
            spec = local.load_spec(state_dir)
    except ClusterError as exc:
        return _fail(exc)
    for key, value in spec.env().items():
        print(f"export {key}={shlex.quote(value)}")
    return 0
