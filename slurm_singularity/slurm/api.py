"""Contract of the Slurm access layer: the only code that talks to Slurm.

Everything above it (the cluster tools, the scheduler daemon, the admin CLI)
sees Slurm through ``SlurmClient``: value types in, value types out. The CLI
backend (``cli.py``) uses the commands' ``--json`` output where Slurm 22.05
has it; a pyslurm backend can sit behind the same Protocol on sites whose
Slurm matches a pyslurm release.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence


class SlurmError(RuntimeError):
    """The root of this subsystem's errors, and itself: a Slurm command
    failed. ``command`` is what ran, ``stderr`` what Slurm said (already
    stripped), ``returncode`` its exit status."""

    def __init__(self, command: Sequence[str], returncode: int, stderr: str) -> None:
        self.command = list(command)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"{self.command[0]} failed ({returncode}): {self.stderr}")


class SlurmOutputError(SlurmError):
    """Slurm printed something this layer cannot read: ``field`` (where it
    came from, e.g. ``squeue tres_per_node``) held ``text``."""

    def __init__(self, field: str, text: str, reason: str) -> None:
        self.field = field
        self.text = text
        self.reason = reason
        RuntimeError.__init__(self, f"{field}: cannot read {text[:80]}: {reason}")
        self.command, self.returncode, self.stderr = [field], 0, str(self)


class SlurmState(enum.StrEnum):
    """A job's state as Slurm 22.05 names it (``JOB_STATE_BASE`` and the
    flags squeue shows as states). A ``str`` whose value is Slurm's own
    spelling, so it prints and compares as Slurm's word. Slurm moves a job PENDING -> CONFIGURING ->
    RUNNING -> COMPLETING -> one of the terminal states; REQUEUED and the
    ``REQUEUE_*`` holds lead back to PENDING. ``UNKNOWN`` stands for a state
    this list lacks (a later Slurm's)."""

    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"
    RUNNING = "RUNNING"
    RESIZING = "RESIZING"
    SIGNALING = "SIGNALING"
    STAGE_OUT = "STAGE_OUT"
    COMPLETING = "COMPLETING"
    SUSPENDED = "SUSPENDED"
    STOPPED = "STOPPED"
    REQUEUED = "REQUEUED"
    REQUEUE_HOLD = "REQUEUE_HOLD"
    REQUEUE_FED = "REQUEUE_FED"
    RESV_DEL_HOLD = "RESV_DEL_HOLD"
    SPECIAL_EXIT = "SPECIAL_EXIT"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    PREEMPTED = "PREEMPTED"
    NODE_FAIL = "NODE_FAIL"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    REVOKED = "REVOKED"
    UNKNOWN = "UNKNOWN"

    @classmethod
    def parse(cls, text: str) -> "SlurmState":
        """Slurm's spelling (any case; sacct's ``CANCELLED by 0`` too)."""
        word = (text or "").strip().split(" ")[0].upper()
        try:
            return cls(word)
        except ValueError:
            return cls.UNKNOWN

    @property
    def running(self) -> bool:
        """Holds its nodes and GPUs now."""
        return self in _RUNNING

    @property
    def pending(self) -> bool:
        """Waits to start (a requeued job too)."""
        return self in _PENDING


_RUNNING = frozenset({SlurmState.RUNNING, SlurmState.COMPLETING, SlurmState.CONFIGURING})
_PENDING = frozenset({SlurmState.PENDING, SlurmState.REQUEUED, SlurmState.REQUEUE_HOLD,
                      SlurmState.REQUEUE_FED})


@dataclass(frozen=True)
class Node:
    """A node as sinfo reports it."""

    name: str
    state: str                 # lower case, e.g. "idle", "mixed", "allocated", "down"
    gpus: int                  # configured gpu gres count
    cpus: int
    partitions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Job:
    """A job as squeue reports it (fields the project reads)."""

    job_id: int
    name: str
    state: SlurmState
    partition: str
    account: str
    user: str
    nodes: str                 # node list, e.g. "n[1-2]"
    comment: str = ""
    reason: str = ""
    restart_count: int = 0
    #: GPUs the job's request asks for in all (the request as updated, not
    #: a requeued job's stale node count).
    gpus: int = 0
    #: Set by job_submit.lua (the job tag) and the daemon (its marks); users
    #: cannot write it, Slurm operators and other tools can. Read it as a
    #: typed record with ``admin_comment.AdminComment.parse``.
    admin_comment: str = ""
    #: Epoch seconds; 0 = not set. Slurm resets ``submit_time`` when it
    #: requeues a job, and sets ``eligible_time`` to when it may start (a
    #: ``--begin``, or the requeue delay after a requeue).
    submit_time: float = 0.0
    start_time: float = 0.0
    eligible_time: float = 0.0
    #: Scheduling priority; 0 = held. None = not reported.
    priority: int | None = None
    #: ``(node, GPUs)`` held on each node while running; () otherwise.
    placement: tuple[tuple[str, int], ...] = ()
    #: Nodes asked for (or held); 0 = not reported.
    node_count: int = 0
    #: In a Slurm federation: the cluster whose slurmctld owns the job
    #: ("" = not federated) and the sibling clusters it may still run on.
    federation_origin: str = ""
    federation_siblings_viable: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.state, SlurmState):
            object.__setattr__(self, "state", SlurmState.parse(str(self.state)))

    @property
    def allocated_gpus(self) -> int:
        """GPUs held now (0 unless running)."""
        return sum(g for _, g in self.placement)


@dataclass(frozen=True)
class JobRun:
    """One run of a job as sacct reports it (a requeued job has several)."""

    job_id: int
    start: str                 # ISO time, or "Unknown"/"None"
    end: str
    elapsed_s: int
    state: SlurmState
    exit_code: str             # "75:0"
    nodes: str
    gpus: int
    partition: str
    work_dir: str


class SlurmClient(Protocol):
    """What the project needs from Slurm."""

    env: Mapping[str, str]

    def nodes(self) -> list[Node]:
        """:raises SlurmError: sinfo failed."""

    def jobs(self) -> list[Job]:
        """All jobs slurmctld knows, any state. :raises SlurmError:"""

    def submit(self, args: Sequence[str], script: str | None = None) -> int:
        """sbatch ``args`` (options and maybe a script path), or the script
        text on stdin. Returns the job id. :raises SlurmError: sbatch refused it."""

    def scontrol(self, *args: str) -> str:
        """Run ``scontrol args``; returns its stdout. :raises SlurmError:"""

    def show_job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o`` parsed into key -> value. :raises SlurmError:"""

    def hostnames(self, nodelist: str) -> list[str]:
        """A compressed node list (``n[3-4]``) as node names, in order.
        :raises SlurmError: scontrol failed or the list names no node."""

    def node_address(self, name: str) -> str:
        """The address Slurm reaches node ``name`` at (its ``NodeAddr``; the
        node name itself need not resolve). :raises SlurmError:"""

    def cancel(self, *job_ids: int, signal: str | None = None, full: bool = False) -> None:
        """scancel the jobs (or send them ``signal``: to their srun steps, or
        with ``full`` to every process of the job, the batch shell too).
        :raises SlurmError:"""

    def running_steps(self, job_id: int) -> list[tuple[str, float]]:
        """``(JOB.N, seconds running)`` of the job's srun steps running now,
        not the batch or extern step: a signal (scancel --signal) reaches
        only these. :raises SlurmError:"""

    def ensure_accounts(self, members: Mapping[str, Sequence[str]],
                        gpu_limits: Mapping[str, int | None],
                        default_accounts: Mapping[str, str]) -> list[str]:
        """Make slurmdbd hold the accounts of ``members`` (account -> users)
        with an association per user, each account's GrpTRES gres/gpu from
        ``gpu_limits`` (None: no limit) and each user's DefaultAccount.
        Adds, never removes. :raises SlurmError:"""

    def job_runs(self, job_id: int) -> list[JobRun]:
        """Every run of the job from accounting (sacct), oldest first.
        :raises SlurmError: sacct failed (no accounting)."""
