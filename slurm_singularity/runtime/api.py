"""The runtime's contract: value types, lifecycles and errors.

The runtime is what runs inside a job: the launcher (``singularity-run``)
starts one worker per device; each worker runs ``k = W / D`` logical ranks
of the job one after another inside every step (replica splicing), reduces
gradients once across devices, and writes one replica's state when asked to
stop. The other subsystems meet the runtime only through files whose shapes
are fixed here (checkpoint metadata, ``history.jsonl``) and through
``slurm_singularity.contract``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class JobRuntimeError(RuntimeError):
    """Root of the runtime's errors: a caller catches this one class."""


class RuntimeSetupError(JobRuntimeError, ValueError):
    """Bad job shape or arguments (W not a multiple of D, D < 1, ...); the
    message names the field or option."""


class CheckpointError(JobRuntimeError):
    """A checkpoint could not be written or none could be read."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated, bit-flipped or not a checkpoint; the
    message names the file and what is wrong. The runtime then falls back to
    the previous checkpoint."""


class UntrustedCheckpointError(CorruptCheckpointError):
    """A checkpoint is unsigned, or its signature does not verify with the
    user's key: planted, altered or another user's. Refused as a corrupt one
    is (the previous checkpoint is used); the message says how to proceed."""


class CheckpointDirError(CheckpointError):
    """The checkpoint directory is unsafe (a level owned by another user or
    writable by group or others) or cannot be created or written; the
    message names the path, its owner and mode, and the rule."""


class CheckpointKeyError(CheckpointError):
    """The key that signs checkpoints cannot be created or read, or is
    unsafe (owned by another user, readable by others, not 32 bytes); the
    message names the file and the rule."""


class CheckpointReason(enum.Enum):
    """Why a checkpoint was written (recorded in its metadata)."""

    PERIODIC = "periodic"
    PREEMPT = "preempt"
    FINAL = "final"


class StopReason(enum.Enum):
    """How one run of a job ended (one record of ``history.jsonl``).

    A run starts RUNNING (not recorded) and ends in exactly one of the
    terminal states below; a requeued job starts a new run.
    """

    PREEMPTED = "preempted"   # agreed on a step, checkpointed, exit 75
    FINISHED = "finished"     # reached the last step, final checkpoint
    STOPPED = "stopped"       # ended early by trainer.stop() or a break, exit 0
    FAILED = "failed"         # a worker died or raised; steps may be lost


class BufferPolicy(enum.Enum):
    """What happens to module buffers (BatchNorm running statistics) of the
    logical ranks; both policies are what DDP does with the same flag.

    BROADCAST (DDP's default, ``broadcast_buffers=True``): at the start of
    every step each logical rank starts from logical rank 0's buffers; the
    updates the other ranks make during their forward pass are discarded.
    One set of buffers is kept and checkpointed.

    PER_RANK (DDP with ``broadcast_buffers=False``): every logical rank keeps
    and updates its own buffers; all ``W`` sets are checkpointed and follow
    their logical rank to whatever device it runs on after a restart.
    """

    BROADCAST = "broadcast"
    PER_RANK = "per_rank"


@dataclass(frozen=True)
class JobShape:
    """Which logical ranks this worker runs.

    world_size: logical ranks ``W`` of the job (fixed for its whole life).
    devices: devices ``D`` the job runs on now; divides ``W``.
    device_rank: this worker's device index, ``0 <= device_rank < D``.
    """

    world_size: int
    devices: int
    device_rank: int = 0

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise RuntimeSetupError(f"devices D={self.devices} must be at least 1")
        if self.world_size < 1:
            raise RuntimeSetupError(f"world size W={self.world_size} must be at least 1")
        if self.world_size % self.devices:
            raise RuntimeSetupError(
                f"world size W={self.world_size} is not a multiple of devices D={self.devices}")
        if not 0 <= self.device_rank < self.devices:
            raise RuntimeSetupError(
                f"device rank {self.device_rank} is not in [0, {self.devices})")

    @property
    def splice(self) -> int:
        """Splice factor ``k = W / D``: logical ranks per device."""
        return self.world_size // self.devices

    @property
    def logical_ranks(self) -> range:
        """This device's logical ranks: a contiguous block of ``k``."""
        k = self.splice
        return range(self.device_rank * k, (self.device_rank + 1) * k)


@dataclass(frozen=True)
class CheckpointMeta:
    """The small JSON written beside each checkpoint (``ckpt-<step>.json``)
    so that tools can list checkpoints without loading them."""

    step: int
    wall_time: float          # seconds since the epoch when it became durable
    devices: int              # D when it was written
    world_size: int           # W
    reason: CheckpointReason
    file: str                 # file name of the checkpoint in the directory
    bytes: int                # size of the checkpoint file
    checksum: str             # "<algorithm>:<hex>" of the payload
    write_s: float = 0.0      # seconds from start of write to durable

    def __post_init__(self) -> None:
        if self.step < 0:
            raise ValueError(f"checkpoint step {self.step} is negative")
        if not isinstance(self.reason, CheckpointReason):
            raise ValueError(f"checkpoint reason {self.reason!r} is not a CheckpointReason")


@dataclass(frozen=True)
class HistoryRecord:
    """One run of a job: one line of ``history.jsonl`` in the checkpoint
    directory. ``steps_lost`` counts the steps computed after the last
    checkpoint, which a restart computes again."""

    start_time: float         # seconds since the epoch
    end_time: float
    devices: int              # D of this run
    world_size: int           # W
    first_step: int           # step restored at the start of the run
    last_step: int            # last completed step
    stop: StopReason
    checkpoint_written: bool  # a checkpoint was written when it stopped
    steps_lost: int
    exit_code: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.stop, StopReason):
            raise ValueError(f"history stop {self.stop!r} is not a StopReason")
        if self.steps_lost < 0:
            raise ValueError(f"history steps_lost {self.steps_lost} is negative")
        if self.last_step < self.first_step:
            raise ValueError(
                f"history last_step {self.last_step} < first_step {self.first_step}")
