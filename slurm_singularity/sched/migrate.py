"""Move a running job to another cluster of a federation: checkpoint,
requeue held, narrow its siblings to the destination, copy its checkpoint
to the destination's storage root, release.

Why shaped so: each member of a federation keeps checkpoints in its own
storage root (a checkpoint is read on the cluster that holds it), so the
job must not start on the destination before its checkpoint is there, whole.
The job is therefore held from its requeue until the copy is verified. The
copy is atomic: written to a temporary directory beside the destination,
each file fsync'd and compared with the source by SHA-256, then renamed into
place; a reader sees the old checkpoint or the whole new one, never a part.

A job resumes from a copied checkpoint only if it names its checkpoint
directory under the storage root of the cluster it runs on (for example
``SINGULARITY_CKPT_DIR=$ROOT/$SLURM_CLUSTER_NAME/storage/ckpt/job-$SLURM_JOB_ID``);
``relative`` is that directory relative to the storage root.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..slurm.api import SlurmError
from .federation import Member

log = logging.getLogger(__name__)


class MigrationError(RuntimeError):
    """A migration could not go on; the message says at which step and why."""


class MigrationStep(enum.Enum):
    """Steps of a migration, in order: SIGNALLED -> REQUEUED (held) ->
    NARROWED -> COPIED -> RELEASED (terminal)."""

    SIGNALLED = "signalled"
    REQUEUED = "requeued"
    NARROWED = "narrowed"
    COPIED = "copied"
    RELEASED = "released"


@dataclass(frozen=True)
class MigrationReport:
    job_id: int
    source: str
    destination: str
    #: Files and bytes copied.
    files: int
    bytes: int
    #: Seconds from the signal to the release.
    seconds: float
    steps: tuple[MigrationStep, ...]


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every regular file under ``root``."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[str(path.relative_to(root))] = h.hexdigest()
    return out


def copy_checkpoint(src: Path, dst: Path) -> tuple[int, int]:
    """Copy the checkpoint directory ``src`` to ``dst`` atomically and
    verified; returns (files, bytes).

    :raises MigrationError: ``src`` holds nothing, or the copy differs.
    """
    want = tree_digest(src) if src.is_dir() else {}
    if not want:
        raise MigrationError(f"no checkpoint in {src}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.copy-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, symlinks=False)
    size = 0
    for path in tmp.rglob("*"):
        if path.is_file():
            size += path.stat().st_size
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    got = tree_digest(tmp)
    if got != want:
        bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        shutil.rmtree(tmp, ignore_errors=True)
        raise MigrationError(f"the copy of {src} differs from it in {', '.join(bad[:5])}")
    os.chmod(tmp, os.stat(src).st_mode & 0o7777)
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        os.rename(dst, old)
    os.rename(tmp, dst)
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.rmtree(old, ignore_errors=True)
    return len(got), size


def _state(member: Member, job_id: int) -> tuple[str, str]:
    """(state, reason) of the member's own copy of the job; ('', '') if none."""
    for job in member.client.jobs():
        if job.job_id == job_id and job.state != "REVOKED":
            return job.state, job.reason
    return "", ""


def migrate(job_id: int, source: Member, destination: Member, relative: Path, signal: str,
            *, timeout_s: float = 120.0, progress: Callable[[str], None] = lambda m: None,
            clock: Callable[[], float] = time.monotonic) -> MigrationReport:
    """Move the running job ``job_id`` from ``source`` to ``destination``
    (see the module docstring). ``signal`` asks its runtime to checkpoint
    and exit with the requeue code (the tier's signal).

    :raises MigrationError: a step failed or timed out (named).
    """
    t0 = clock()
    steps = []
    state, _ = _state(source, job_id)
    if state != "RUNNING":
        raise MigrationError(f"job {job_id} is not running on {source.name} ({state or 'absent'})")
    try:
        source.client.cancel(job_id, signal=signal)
        steps.append(MigrationStep.SIGNALLED)
        progress(f"[job {job_id}] sent SIG{signal}; waiting for its checkpoint and requeue")
        deadline = clock() + timeout_s
        while True:
            state, reason = _state(source, job_id)
            if state in ("PENDING", "REQUEUED", "REQUEUE_HOLD"):
                break
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", ""):
                raise MigrationError(f"job {job_id} ended ({state or 'gone'}) instead of "
                                     f"being requeued")
            if clock() > deadline:
                raise MigrationError(f"job {job_id} not requeued {timeout_s:g} s after "
                                     f"SIG{signal} (still {state})")
            time.sleep(0.2)
        source.client.scontrol("hold", str(job_id))
        steps.append(MigrationStep.REQUEUED)
        source.client.scontrol("update", f"JobId={job_id}", f"Clusters={destination.name}")
        steps.append(MigrationStep.NARROWED)
        progress(f"[job {job_id}] requeued and held; its only sibling is now {destination.name}")
        if source.storage_root is None or destination.storage_root is None:
            raise MigrationError(f"{source.name} or {destination.name} has no storage root")
        files, size = copy_checkpoint(source.storage_root / relative,
                                      destination.storage_root / relative)
        steps.append(MigrationStep.COPIED)
        progress(f"[job {job_id}] copied its checkpoint ({files} files, {size} bytes, verified) "
                 f"to {destination.storage_root / relative}")
        source.client.scontrol("release", str(job_id))
        steps.append(MigrationStep.RELEASED)
    except SlurmError as exc:
        raise MigrationError(f"job {job_id}: after {steps[-1].value if steps else 'start'}: "
                             f"{exc}") from None
    seconds = clock() - t0
    log.info("[job %s] migrated %s -> %s in %.1f s", job_id, source.name, destination.name,
             seconds)
    return MigrationReport(job_id, source.name, destination.name, files, size, seconds,
                           tuple(steps))
