"""Contract of the local cluster: a real Slurm (munged, slurmctld, several
slurmd, emulated GPUs) on one machine, for the demo and the tests.

Several such clusters can coexist (a person's demo and the test suite), so
every port, path and size is a field of ``ClusterSpec``; nothing is global.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path


class ClusterError(RuntimeError):
    """The local cluster could not be brought up, down or read; the message
    says what and names the option, port or path at fault."""


class DaemonKind(enum.Enum):
    """The daemons a local cluster runs. Each is started once by ``up`` and
    stopped by its recorded pid by ``down``."""

    MUNGED = "munged"
    MARIADBD = "mariadbd"
    SLURMDBD = "slurmdbd"
    SLURMCTLD = "slurmctld"
    SLURMD = "slurmd"


_NAME = re.compile(r"^[a-z][a-z0-9]{0,15}$")


@dataclass(frozen=True)
class ClusterSpec:
    """Shape and location of one local cluster."""

    #: Directory for rendered configuration, spool, logs, pids and device files.
    state_dir: Path
    #: Number of slurmd nodes, named n1..nN; 1..64.
    nodes: int = 4
    #: Emulated GPUs per node; 0..64.
    gpus_per_node: int = 8
    #: CPUs each node claims (may exceed the machine's; config_overrides); 1..4096.
    cpus_per_node: int = 16
    #: Memory each node claims, MiB; 1..2**30.
    memory_mb_per_node: int = 64000
    #: slurmctld's port; slurmd of node i listens on slurmd_base_port + i - 1.
    ctld_port: int = 16817
    #: Port of node n1's slurmd.
    slurmd_base_port: int = 17001
    #: Slurm ClusterName; letters and digits.
    cluster_name: str = "singularity"
    #: Seconds to wait for every node to be idle (stretched by the load); 1..3600.
    ready_timeout_s: float = 60.0
    #: Run slurmdbd (and a private MariaDB for it) so that sacct works.
    accounting: bool = True
    #: slurmdbd's port; 0 = ctld_port - 1.
    dbd_port: int = 0
    #: The private MariaDB's port (127.0.0.1 only); 0 = ctld_port - 2.
    mysql_port: int = 0
    #: State directory of another local cluster whose munged, MariaDB and
    #: slurmdbd this one uses (a member of a federation: Slurm federates
    #: clusters that share one slurmdbd, and they must share a munge key);
    #: None = its own. ``dbd_port`` must then be that cluster's.
    shared_state_dir: Path | None = None

    def __post_init__(self) -> None:
        if not self.dbd_port:
            object.__setattr__(self, "dbd_port", self.ctld_port - 1)
        if not self.mysql_port:
            object.__setattr__(self, "mysql_port", self.ctld_port - 2)
        if not 1 <= self.nodes <= 64:
            raise ValueError(f"--nodes must be between 1 and 64, not {self.nodes}")
        if not 0 <= self.gpus_per_node <= 64:
            raise ValueError(
                f"--gpus-per-node must be between 0 and 64, not {self.gpus_per_node}")
        if not 1 <= self.cpus_per_node <= 4096:
            raise ValueError(
                f"--cpus-per-node must be between 1 and 4096, not {self.cpus_per_node}")
        if not 1 <= self.memory_mb_per_node <= 1 << 30:
            raise ValueError(f"memory_mb_per_node must be between 1 and {1 << 30} MiB, "
                             f"not {self.memory_mb_per_node}")
        if not 1 <= self.ready_timeout_s <= 3600:     # also refuses nan
            raise ValueError(f"ready_timeout_s must be between 1 and 3600 s, "
                             f"not {self.ready_timeout_s}")
        for field, port in (("--ctld-port", self.ctld_port),
                            ("--slurmd-port", self.slurmd_base_port),
                            ("--dbd-port", self.dbd_port), ("--mysql-port", self.mysql_port)):
            if not 1024 <= port <= 65535:
                raise ValueError(f"{field} must be between 1024 and 65535, not {port}")
        if self.slurmd_base_port + self.nodes - 1 > 65535:
            raise ValueError("--slurmd-port leaves no room for every node's port")
        lo, hi = self.slurmd_base_port, self.slurmd_base_port + self.nodes - 1
        for field, port in (("--ctld-port", self.ctld_port), ("--dbd-port", self.dbd_port),
                            ("--mysql-port", self.mysql_port)):
            if lo <= port <= hi:
                raise ValueError(f"{field} {port} collides with the slurmd ports {lo}-{hi}")
        if len({self.ctld_port, self.dbd_port, self.mysql_port}) != 3:
            raise ValueError("--ctld-port, --dbd-port and --mysql-port must differ")
        if not _NAME.match(self.cluster_name):
            raise ValueError(f"--name {self.cluster_name!r} must be lower-case letters and digits")
        if self.shared_state_dir is not None and not self.accounting:
            raise ValueError("shared_state_dir needs accounting (the shared slurmdbd)")

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(f"n{i}" for i in range(1, self.nodes + 1))

    @property
    def node_range(self) -> str:
        return "n1" if self.nodes == 1 else f"n[1-{self.nodes}]"

    @property
    def owns_services(self) -> bool:
        """Whether this cluster runs its own munged (and MariaDB, slurmdbd)."""
        return self.shared_state_dir is None

    @property
    def ports(self) -> tuple[int, ...]:
        """The ports this cluster's own daemons listen on."""
        extra = (self.dbd_port, self.mysql_port) if self.accounting and self.owns_services else ()
        return (self.ctld_port,) + extra + tuple(
            self.slurmd_base_port + i for i in range(self.nodes))

    @property
    def conf_dir(self) -> Path:
        return self.state_dir / "etc"

    @property
    def slurm_conf(self) -> Path:
        return self.conf_dir / "slurm.conf"

    @property
    def storage_root(self) -> Path:
        """Where this cluster's jobs keep checkpoints (a federation member's
        own storage: a checkpoint is read on the cluster that holds it)."""
        return self.state_dir / "storage"

    @property
    def munge_socket(self) -> Path:
        """munged's socket, in a directory of its own (0755) so that every
        local user can authenticate; the key's directory stays 0700. That of
        ``shared_state_dir`` when set."""
        return (self.shared_state_dir or self.state_dir) / "munge-socket" / "munge.socket"

    @property
    def db_secret(self) -> Path:
        """Password of slurmdbd's MariaDB user (0600, made once)."""
        return self.state_dir / "db.secret"

    def env(self) -> dict[str, str]:
        """Variables that point Slurm's commands at this cluster."""
        return {"SLURM_CONF": str(self.slurm_conf)}


@dataclass(frozen=True)
class NodeStatus:
    name: str
    state: str
    gpus: int


@dataclass(frozen=True)
class ClusterStatus:
    """What ``cluster status`` reports."""

    spec_file: Path
    daemons: dict[str, int | None]   # daemon name -> live pid, or None
    nodes: tuple[NodeStatus, ...]

    @property
    def running(self) -> bool:
        return any(pid is not None for pid in self.daemons.values())
