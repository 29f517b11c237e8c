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
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import contract
from ..slurm.api import SlurmError
from .api import SchedError
from .federation import Member

log = logging.getLogger(__name__)


class MigrationError(SchedError):
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
    # a copier killed mid-copy left its temporary (and maybe the old copy
    # it had set aside): the source is whole, so start again from it
    for stale in (*dst.parent.glob(f".{dst.name}.copy-*"), *dst.parent.glob(f".{dst.name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = dst.with_name(f".{dst.name}.copy-{os.getpid()}")
    shutil.copytree(src, tmp, symlinks=False)
    delay = contract.migration_copy_delay_s()
    if delay:
        log.warning("copy of %s: testing delay of %.1f s (%s)", src, delay,
                    contract.MIGRATION_COPY_DELAY_S)
        time.sleep(delay)
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


@dataclass(frozen=True)
class InFlight:
    """A migration under way, as its journal keeps it: ``step`` is the last
    step done."""

    job_id: int
    source: str
    destination: str
    #: The job's checkpoint directory relative to each member's storage root.
    relative: str
    step: MigrationStep
    #: When it began, epoch seconds.
    since: float


class MigrationJournal:
    """Migrations in flight, one JSON file rewritten atomically at each step,
    so that a placer killed at any point resumes each migration at its next
    step (every step is idempotent) and never starts a second one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[int, InFlight]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise MigrationError(f"cannot read the migration journal {self.path}: {exc}") from None
        return {int(k): InFlight(int(k), v["source"], v["destination"], v["relative"],
                                 MigrationStep(v["step"]), float(v["since"]))
                for k, v in data.items()}

    def put(self, entry: InFlight) -> None:
        entries = self.load()
        entries[entry.job_id] = entry
        self._write(entries)

    def drop(self, job_id: int) -> None:
        entries = self.load()
        if entries.pop(job_id, None) is not None:
            self._write(entries)

    def _write(self, entries: dict[int, InFlight]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as fh:
            json.dump({str(e.job_id): {"source": e.source, "destination": e.destination,
                                       "relative": e.relative, "step": e.step.value,
                                       "since": e.since} for e in entries.values()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


def advance(entry: InFlight, source: Member, destination: Member,
            progress: Callable[[str], None] = lambda m: None,
            record: Callable[[InFlight], None] = lambda e: None) -> InFlight | None:
    """Take the migration's next steps that can be taken now; returns the
    entry as it stands after them (unchanged: waiting for the job's requeue),
    or None once the job is released on the destination. ``record`` gets the
    entry after each step done (the journal's write), so a caller killed
    between two steps resumes at the next one. Idempotent: a step redone
    after a crash finds its work done.

    :raises MigrationError: the job ended, or the checkpoint cannot be copied.
    :raises SlurmError: a Slurm call failed (try again next pass).
    """
    job_id = entry.job_id
    step = entry.step

    def done(now: MigrationStep) -> MigrationStep:
        record(InFlight(job_id, entry.source, entry.destination, entry.relative, now,
                        entry.since))
        return now

    if step is MigrationStep.SIGNALLED:
        state, _ = _state(source, job_id)
        if state in ("RUNNING", "COMPLETING", "CONFIGURING"):
            return entry                       # still checkpointing
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", ""):
            raise MigrationError(f"job {job_id} ended ({state or 'gone'}) instead of being "
                                 f"requeued")
        source.client.scontrol("hold", str(job_id))
        progress(f"[job {job_id}] requeued; held until its checkpoint is on {destination.name}")
        step = done(MigrationStep.REQUEUED)
    if step is MigrationStep.REQUEUED:
        source.client.scontrol("update", f"JobId={job_id}", f"Clusters={destination.name}")
        progress(f"[job {job_id}] its only sibling is now {destination.name}")
        step = done(MigrationStep.NARROWED)
    if step is MigrationStep.NARROWED:
        if source.storage_root is None or destination.storage_root is None:
            raise MigrationError(f"{source.name} or {destination.name} has no storage root")
        progress(f"[job {job_id}] copying its checkpoint to {destination.name}")
        files, size = copy_checkpoint(source.storage_root / entry.relative,
                                      destination.storage_root / entry.relative)
        progress(f"[job {job_id}] copied its checkpoint ({files} files, {size} bytes, verified) "
                 f"to {destination.storage_root / entry.relative}")
        step = done(MigrationStep.COPIED)
    if step is MigrationStep.COPIED:
        try:
            source.client.scontrol("release", str(job_id))
        except SlurmError as exc:
            if "not held" not in exc.stderr.lower():
                raise
        progress(f"[job {job_id}] released on {destination.name}")
        return None
    return InFlight(job_id, entry.source, entry.destination, entry.relative, step, entry.since)


def migrate(job_id: int, source: Member, destination: Member, relative: Path, signal: str,
            *, timeout_s: float = 120.0, progress: Callable[[str], None] = lambda m: None,
            clock: Callable[[], float] = time.monotonic) -> MigrationReport:
    """Move the running job ``job_id`` from ``source`` to ``destination``
    now (see the module docstring), waiting for each step. ``signal`` asks
    its runtime to checkpoint and exit with the requeue code (its tier's).

    :raises MigrationError: a step failed or timed out (named).
    """
    t0 = clock()
    state, _ = _state(source, job_id)
    if state != "RUNNING":
        raise MigrationError(f"job {job_id} is not running on {source.name} ({state or 'absent'})")
    entry: InFlight | None = InFlight(job_id, source.name, destination.name, str(relative),
                                      MigrationStep.SIGNALLED, time.time())
    deadline = clock() + timeout_s
    last = MigrationStep.SIGNALLED
    try:
        source.client.cancel(job_id, signal=signal)
        progress(f"[job {job_id}] sent SIG{signal}; waiting for its checkpoint and requeue")
        while entry is not None:
            last = entry.step
            entry = advance(entry, source, destination, progress)
            if entry is not None and entry.step is last:
                if clock() > deadline:
                    raise MigrationError(f"job {job_id} not requeued {timeout_s:g} s after "
                                         f"SIG{signal}")
                time.sleep(0.2)
    except SlurmError as exc:
        raise MigrationError(f"job {job_id}: after {last.value}: {exc}") from None
    seconds = clock() - t0
    log.info("[job %s] migrated %s -> %s in %.1f s", job_id, source.name, destination.name,
             seconds)
    copied = destination.storage_root / relative if destination.storage_root else None
    files = [p for p in copied.rglob("*") if p.is_file()] if copied else []
    return MigrationReport(job_id, source.name, destination.name, len(files),
                           sum(p.stat().st_size for p in files), seconds, tuple(MigrationStep))
