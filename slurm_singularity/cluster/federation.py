"""A local Slurm federation: several local clusters (``local.py``) that share
one munged and one slurmdbd, joined in one Slurm federation.

Why shaped so: Slurm federates clusters that name the same slurmdbd
(DESIGN.md, Facts); a job submitted to one member gets a sibling on every
member and the first that can start it wins. So the first member is an
ordinary local cluster (munged, MariaDB, slurmdbd, slurmctld, slurmd) and
every further member runs only its slurmctld and slurmd, pointing at the
first one's munged and slurmdbd (``ClusterSpec.shared_state_dir``). Each
member keeps its own state directory ``<state_dir>/<member>`` and ports, so
``local.down``, ``local.status`` and ``local.restart`` work on it unchanged.
A slurmctld schedules nothing until its federation's siblings are synced,
and joins a federation made after it started only when restarted: ``up``
makes the federation in slurmdbd, restarts every slurmctld and waits until
each sees every sibling synced.

The federation's own record is ``<state_dir>/federation.json``; ``down``
needs nothing but the state directory.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..policy.api import Policy
from ..slurm.api import SlurmError
from ..slurm.cli import CliSlurmClient
from . import local
from .api import ClusterError, ClusterSpec, ClusterStatus

log = logging.getLogger(__name__)

FEDERATION_FILE = "federation.json"
#: Ports between two members: member i's slurmctld listens on
#: ``base_port + PORT_STRIDE * i``, its slurmd from there + ``SLURMD_OFFSET``.
PORT_STRIDE = 100
SLURMD_OFFSET = 10
#: Seconds each slurmctld gets to see every sibling synced (scaled by load).
SYNC_WAIT_S = 60.0
MAX_MEMBERS = 16

_NAME = re.compile(r"^[a-z][a-z0-9]{0,15}$")
_MEMBER = re.compile(r"^([^:]*):(\d+)x(\d+)$")


@dataclass(frozen=True)
class MemberShape:
    """One member cluster of a ``--clusters`` list: ``NAME:NODESxGPUS``."""

    #: Slurm ClusterName; lower-case letters and digits, at most 16.
    name: str
    #: slurmd nodes; 1..64.
    nodes: int
    #: Emulated GPUs per node; 0..64.
    gpus_per_node: int


def parse_members(text: str) -> tuple[MemberShape, ...]:
    """``east:2x8,west:2x8`` -> member shapes.

    :raises ValueError: names ``--clusters`` and the member at fault.
    """
    members = []
    for i, item in enumerate(text.split(","), 1):
        m = _MEMBER.match(item.strip())
        if not m:
            raise ValueError(f"--clusters member {i} {item.strip()!r} must be NAME:NODESxGPUS "
                             f"(for example east:2x8)")
        name, nodes, gpus = m.group(1), int(m.group(2)), int(m.group(3))
        if not _NAME.match(name):
            raise ValueError(f"--clusters member {i}: name {name!r} must be lower-case letters "
                             f"and digits, starting with a letter, at most 16")
        if not 1 <= nodes <= 64:
            raise ValueError(f"--clusters member {name!r}: nodes must be between 1 and 64, "
                             f"not {nodes}")
        if not 0 <= gpus <= 64:
            raise ValueError(f"--clusters member {name!r}: GPUs per node must be between "
                             f"0 and 64, not {gpus}")
        members.append(MemberShape(name, nodes, gpus))
    return tuple(members)


@dataclass(frozen=True)
class FederationSpec:
    """Shape and location of a local federation."""

    #: Slurm federation name; lower-case letters and digits.
    name: str
    #: Directory of the federation record; member NAME lives in ``state_dir/NAME``.
    state_dir: Path
    #: The member clusters, in order; the first runs munged and slurmdbd. 2..16.
    members: tuple[MemberShape, ...]
    #: slurmctld port of the first member; member i's is this + 100 i, its
    #: slurmd from there + 10; slurmdbd on this - 1, MariaDB on this - 2.
    base_port: int = 47017
    #: Seconds to wait for each member's nodes to be idle; 1..3600.
    ready_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"--federation {self.name!r} must be lower-case letters and digits, "
                             f"starting with a letter, at most 16")
        if not 2 <= len(self.members) <= MAX_MEMBERS:
            raise ValueError(f"--clusters must name between 2 and {MAX_MEMBERS} clusters, "
                             f"not {len(self.members)}")
        names = [m.name for m in self.members]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"--clusters names {', '.join(dup)} more than once")
        if self.name in names:
            raise ValueError(f"--federation {self.name!r} must differ from every cluster's name")
        last = self.base_port + PORT_STRIDE * (len(self.members) - 1) + SLURMD_OFFSET + 63
        if not 1026 <= self.base_port or last > 65535:
            raise ValueError(f"--ctld-port {self.base_port} leaves no room for "
                             f"{len(self.members)} clusters' ports (1026..{65535 - last + self.base_port})")
        self.member_specs()       # each member's own checks

    def member_specs(self) -> tuple[ClusterSpec, ...]:
        """One ``ClusterSpec`` per member; all but the first share its services."""
        first = self.state_dir / self.members[0].name
        out = []
        for i, m in enumerate(self.members):
            ctld = self.base_port + PORT_STRIDE * i
            out.append(ClusterSpec(
                state_dir=self.state_dir / m.name, nodes=m.nodes, gpus_per_node=m.gpus_per_node,
                ctld_port=ctld, slurmd_base_port=ctld + SLURMD_OFFSET, cluster_name=m.name,
                ready_timeout_s=self.ready_timeout_s,
                dbd_port=self.base_port - 1, mysql_port=self.base_port - 2,
                shared_state_dir=None if i == 0 else first))
        return tuple(out)

    def member(self, name: str) -> ClusterSpec:
        """:raises ClusterError: no member of that name (naming ``--cluster``)."""
        for spec in self.member_specs():
            if spec.cluster_name == name:
                return spec
        raise ClusterError(f"--cluster {name!r} is not a member of federation {self.name!r} "
                           f"(members: {', '.join(m.name for m in self.members)})")


# -- the federation record ---------------------------------------------------

def is_federation(state_dir: Path) -> bool:
    return (state_dir / FEDERATION_FILE).exists()


def save_spec(spec: FederationSpec) -> None:
    data = {"name": spec.name, "state_dir": str(spec.state_dir), "base_port": spec.base_port,
            "ready_timeout_s": spec.ready_timeout_s,
            "members": [[m.name, m.nodes, m.gpus_per_node] for m in spec.members]}
    local._write_atomic(spec.state_dir / FEDERATION_FILE, json.dumps(data, indent=2) + "\n")


def load_spec(state_dir: Path) -> FederationSpec:
    """:raises ClusterError: no federation was ever brought up there."""
    try:
        data = json.loads((state_dir / FEDERATION_FILE).read_text())
        return FederationSpec(name=data["name"], state_dir=Path(data["state_dir"]),
                              members=tuple(MemberShape(*m) for m in data["members"]),
                              base_port=data["base_port"],
                              ready_timeout_s=data["ready_timeout_s"])
    except FileNotFoundError:
        raise ClusterError(f"no local federation in {state_dir} "
                           f"(run `cluster up --federation` first)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ClusterError(f"cannot read {state_dir / FEDERATION_FILE}: {exc}") from None


# -- up and down ---------------------------------------------------------------

def up(spec: FederationSpec, policy: Policy,
       progress: Callable[[str], None] = lambda msg: None) -> dict[str, ClusterStatus]:
    """Bring up every member, make the federation in slurmdbd, restart every
    slurmctld into it and wait until each sees all its siblings synced.
    Idempotent like ``local.up``; on failure every member started is stopped.

    :raises ClusterError: names the option, port, path or member at fault.
    """
    local._check_state_dir(spec.state_dir)
    if is_federation(spec.state_dir):
        old = load_spec(spec.state_dir)
        if old != spec and any(local.live_daemons(m.state_dir) for m in old.member_specs()):
            raise ClusterError(f"another federation ({old.name}: "
                               f"{', '.join(m.name for m in old.members)}) runs in "
                               f"{spec.state_dir}; run `cluster down` first")
    save_spec(spec)
    members = spec.member_specs()
    try:
        fresh = False
        for member in members:
            if not local.live_daemons(member.state_dir):
                fresh = True
            say = _prefixed(progress, member.cluster_name)
            if not member.owns_services:
                _add_cluster(members[0], member.cluster_name)
            local.up(member, policy, progress=say)
        if _make_federation(spec, members[0]) or fresh:
            _restart_controllers(spec, members, progress)
        for member in members:
            what = f"{member.cluster_name}'s slurmctld to see every sibling synced"
            progress(f"waiting for {what}")
            local._wait_for(lambda: _synced(member, len(members)), SYNC_WAIT_S, what,
                            progress=progress)
            local._wait_for(lambda: local._all_idle(member), spec.ready_timeout_s,
                            f"{member.cluster_name}'s nodes to be idle", progress=progress)
    except BaseException:
        down(spec.state_dir)
        raise
    return {m.cluster_name: local.status(m.state_dir) for m in members}


def down(state_dir: Path, progress: Callable[[str], None] = lambda msg: None) -> list[str]:
    """Stop every member (the first, which holds munged and slurmdbd, last)
    by their recorded pids; returns ``member/daemon`` names stopped. Safe
    to call twice."""
    spec = load_spec(state_dir)
    stopped = []
    for member in reversed(spec.member_specs()):
        if not (member.state_dir / local.SPEC_FILE).exists():
            continue
        say = _prefixed(progress, member.cluster_name)
        try:
            names = local.down(member.state_dir, progress=say)
        except Exception as exc:        # noqa: BLE001 - whatever failed, stop the daemons
            log.warning("%s: cluster down failed (%s); stopping its daemons by pid",
                        member.cluster_name, exc)
            live = {n: r for n, r in local._read_daemons(member.state_dir).items()
                    if local._alive(r)}
            names = local._stop_all(member.state_dir, live, say)
        stopped += [f"{member.cluster_name}/{n}" for n in names]
    return stopped


def status(state_dir: Path) -> dict[str, ClusterStatus]:
    """Member name -> its ``local.status``. :raises ClusterError:"""
    spec = load_spec(state_dir)
    return {m.cluster_name: local.status(m.state_dir) for m in spec.member_specs()
            if (m.state_dir / local.SPEC_FILE).exists()}


def _prefixed(progress: Callable[[str], None], name: str) -> Callable[[str], None]:
    return lambda msg: progress(f"{name}: {msg}")


def _sacctmgr(first: ClusterSpec, *args: str) -> str:
    """``sacctmgr -i ARGS`` against the shared slurmdbd; '' when it says
    there was nothing to do. :raises ClusterError:"""
    client = CliSlurmClient(first.env(), timeout_s=30)
    try:
        return client._run(["sacctmgr", "-i", *args])
    except SlurmError as exc:
        text = f"{exc.stderr}"
        if "Nothing new added" in text or "Nothing to change" in text or \
                "already exists" in text or "already assigned" in text or exc.returncode == 1 and not text.strip():
            return ""
        raise ClusterError(f"sacctmgr {' '.join(args)} failed: {text.strip()[-300:]}") from None


def _add_cluster(first: ClusterSpec, name: str) -> None:
    _sacctmgr(first, "add", "cluster", name)


def _make_federation(spec: FederationSpec, first: ClusterSpec) -> bool:
    """Create (or set the members of) the federation; whether anything changed."""
    clusters = ",".join(m.name for m in spec.members)
    out = _sacctmgr(first, "add", "federation", spec.name, f"clusters={clusters}")
    if out:
        return True
    return bool(_sacctmgr(first, "modify", "federation", "where", f"name={spec.name}", "set",
                          f"clusters={clusters}"))


def _restart_controllers(spec: FederationSpec, members: tuple[ClusterSpec, ...],
                         progress: Callable[[str], None]) -> None:
    """Stop every member's slurmctld, then start them all. Restarting one at
    a time does not work: the sibling that stays up keeps its persistent
    connection to the old process and shows the restarted one as
    ``name::0``, ``Synced:No``, and schedules nothing (seen with 22.05.8)."""
    progress(f"restarting {len(members)} slurmctld into federation {spec.name}")
    for member in members:
        local.stop_daemon(member.state_dir, "slurmctld")
    for member in members:
        local.start_daemon(member.state_dir, "slurmctld")


def _synced(member: ClusterSpec, size: int) -> bool:
    """``scontrol show federation`` on ``member`` lists ``size - 1`` siblings,
    each ``Synced:Yes``."""
    try:
        out = CliSlurmClient(member.env(), timeout_s=5).scontrol("show", "federation")
    except SlurmError:
        return False
    siblings = [line for line in out.splitlines() if line.strip().startswith("Sibling:")]
    return len(siblings) == size - 1 and all("Synced:Yes" in s for s in siblings)
