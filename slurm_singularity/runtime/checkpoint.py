"""Checkpoint files: atomic, checksummed, the last two kept.

Why so: a job is preempted with a grace time and then killed, and a node can
die at any moment, so a checkpoint must be either complete and verified or
ignored. A checkpoint is written to a temporary file, fsynced, renamed into
place and the directory fsynced; its header carries the sha256 and length of
the payload so that a truncated or bit-flipped file is refused with a clear
message and the previous one (the last two are kept) is used instead. A
``filelock`` guards the directory against a second writer (a requeued job
whose old incarnation is still flushing).

File layout of ``ckpt-<step:08d>.pt``::

    b"SSCKPT02\\n" | payload | sha256 hex of payload (64) | payload length
    (16 decimal digits) | b"\\n" | b"SSCKEND\\n"

The checksum is a trailer so that the payload streams straight into the file
while it is hashed; a file cut short lacks the trailer and is refused.
The payload is ``torch.save`` of a dict (see ``splice.Trainer``). Beside it
``ckpt-<step:08d>.json`` holds a ``CheckpointMeta`` for tools such as
``singularity-admin job show``.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy
import torch

from slurm_singularity import contract
from slurm_singularity.runtime import catalog
from slurm_singularity.runtime.catalog import ckpt_name, meta_name, meta_to_json
from slurm_singularity.runtime.dirlock import fsync_dir, lock
from slurm_singularity.runtime.api import (
    CheckpointError, CheckpointMeta, CheckpointReason, CorruptCheckpointError,
)

log = logging.getLogger(__name__)

MAGIC = b"SSCKPT02\n"          # first bytes of every checkpoint file
END = b"SSCKEND\n"             # last bytes: a file without them is incomplete
TRAILER_LEN = 64 + 16 + 1 + len(END)
KEEP = 2


class _RecordingSink:
    """File-like object that ``torch.save`` streams into: each chunk goes to
    the file at once and is remembered for hashing, so that the sha256 is
    computed while the kernel flushes the file (``hash_while_flushing``)
    instead of before; both release the GIL. (Hashing on a thread while
    torch writes was slower on a busy 2-core machine: it competes for the
    CPU, where the flush mostly waits for the disk.) A chunk that lies
    inside the storage of a CPU tensor of the state being saved is
    remembered in place (the state keeps that memory alive); any other chunk
    (pickle bytes, zip headers, a temporary CPU copy of a GPU tensor) is
    copied, because torch may reuse its buffer once ``write`` returns."""

    def __init__(self, fh: Any, state: Any) -> None:
        self.fh = fh
        self.length = 0
        self._ranges = sorted(_cpu_storage_ranges(state))
        self._starts = [start for start, _ in self._ranges]
        self._chunks: list[Any] = []

    def _owned_by_state(self, view: memoryview) -> bool:
        if not self._ranges or view.nbytes == 0:
            return False
        addr = numpy.frombuffer(view, dtype=numpy.uint8).__array_interface__["data"][0]
        i = bisect.bisect_right(self._starts, addr) - 1
        return i >= 0 and addr + view.nbytes <= self._ranges[i][1]

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.fh.write(view)
        self._chunks.append(view if self._owned_by_state(view) else bytes(view))
        self.length += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self.fh.flush()

    def hash_while_flushing(self) -> str:
        """sha256 of everything written, computed while a helper thread
        fdatasyncs the file (both release the GIL)."""
        self.fh.flush()
        flushing = threading.Thread(target=os.fdatasync, args=(self.fh.fileno(),),
                                    name="ckpt-flush")
        flushing.start()
        digest = hashlib.sha256()
        for chunk in self._chunks:
            digest.update(chunk)
        self._chunks.clear()
        flushing.join()
        return digest.hexdigest()


def _cpu_storage_ranges(obj: Any, out: list[tuple[int, int]] | None = None
                        ) -> list[tuple[int, int]]:
    """(start, end) addresses of the storages of every CPU tensor in obj."""
    out = [] if out is None else out
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu":
            storage = obj.untyped_storage()
            out.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
    elif isinstance(obj, dict):
        for value in obj.values():
            _cpu_storage_ranges(value, out)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _cpu_storage_ranges(value, out)
    return out


def _save(state: dict[str, Any], sink: Any) -> None:
    """``torch.save`` without torch's own CRC32 of every record (the sha256
    of the whole payload covers it and costs less than both)."""
    old = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, sink)
    finally:
        torch.serialization.set_crc32_options(old)


def _trailer(digest: str, length: int) -> bytes:
    return digest.encode() + f"{length:016d}".encode() + b"\n" + END


def serialize(state: dict[str, Any]) -> bytes:
    """``state`` -> checkpoint file bytes (header, payload, trailer); the
    writer streams the same layout straight into the file."""
    payload = io.BytesIO()
    _save(state, payload)
    data = payload.getvalue()
    return MAGIC + data + _trailer(hashlib.sha256(data).hexdigest(), len(data))


def deserialize(data: bytes | memoryview, name: str = "checkpoint") -> dict[str, Any]:
    """Checkpoint file bytes -> state.

    :raises CorruptCheckpointError: bad magic, truncated, checksum mismatch
        or an unreadable payload; the message names ``name``.
    """
    data = memoryview(data)
    if len(data) < len(MAGIC) or bytes(data[:len(MAGIC)]) != MAGIC:
        raise CorruptCheckpointError(
            f"checkpoint {name} is not a slurm-singularity checkpoint "
            f"(bad header, {len(data)} bytes); refusing it")
    if len(data) < len(MAGIC) + TRAILER_LEN or bytes(data[-len(END):]) != END:
        raise CorruptCheckpointError(
            f"checkpoint {name} is truncated or incomplete (its trailer is missing, "
            f"{len(data)} bytes); refusing it")
    trailer = bytes(data[-TRAILER_LEN:])
    digest = trailer[:64].decode("ascii", "replace")
    try:
        length = int(trailer[64:80])
    except ValueError:
        raise CorruptCheckpointError(
            f"checkpoint {name} has a corrupt trailer (length field); refusing it") from None
    payload = data[len(MAGIC):len(data) - TRAILER_LEN]
    if len(payload) != length:
        raise CorruptCheckpointError(
            f"checkpoint {name} is truncated or padded: payload is {len(payload)} bytes, "
            f"its trailer says {length}; refusing it")
    actual = hashlib.sha256(payload).hexdigest()
    if actual != digest:
        raise CorruptCheckpointError(
            f"checkpoint {name} fails its checksum (sha256 {actual[:12]}..., trailer says "
            f"{digest[:12]}...): the file was modified or damaged; refusing it")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means corrupt
        raise CorruptCheckpointError(
            f"checkpoint {name} passes its checksum but cannot be loaded: {exc}") from exc


def write(ckpt_dir: str | os.PathLike[str], step: int, state: dict[str, Any], *,
          devices: int, world_size: int, reason: CheckpointReason) -> CheckpointMeta:
    """Write the checkpoint of ``step`` durably (stream to a temporary file
    while hashing, trailer, fsync, rename), then its metadata, fsync the
    directory, and delete all but the newest ``KEEP`` checkpoints.

    :raises CheckpointError: the directory cannot be written.
    """
    wait_for_pruning()
    directory = Path(ckpt_dir)
    started = time.time()
    delay = contract.ckpt_delay_s()
    name = ckpt_name(step)
    tmp = directory / f".{name}.tmp.{os.getpid()}"
    try:
        with lock(directory):
            _remove_stale_temporaries(directory)
            with open(tmp, "wb") as fh:
                fh.write(MAGIC)
                sink = _RecordingSink(fh, state)
                _save(state, sink)
                digest = sink.hash_while_flushing()
                if delay:
                    fh.flush()
                    log.warning("checkpoint %s: testing delay of %.1f s (SINGULARITY_CKPT_DELAY_S)",
                                name, delay)
                    time.sleep(delay)
                fh.write(_trailer(digest, sink.length))
                fh.flush()
                os.fsync(fh.fileno())
                size = fh.tell()
            os.replace(tmp, directory / name)
            meta = CheckpointMeta(
                step=step, wall_time=time.time(), devices=devices, world_size=world_size,
                reason=reason, file=name, bytes=size, sha256=digest,
                write_s=time.time() - started)
            meta_tmp = directory / f".{name}.json.tmp.{os.getpid()}"
            meta_tmp.write_text(json.dumps(meta_to_json(meta), sort_keys=True) + "\n")
            os.replace(meta_tmp, directory / meta_name(step))
            fsync_dir(directory)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {name} in {directory}: {exc}") from exc
    log.info("checkpoint %s written (%s, %d bytes, %.3f s)", name, reason.value, size,
             meta.write_s)
    # Deleting old checkpoints is not needed for durability: do it off the
    # critical path (a non-daemon thread, so the process waits for it).
    global _pruner
    _pruner = threading.Thread(target=_prune_locked, args=(directory,), name="ckpt-prune")
    _pruner.start()
    return meta


_pruner: threading.Thread | None = None


def wait_for_pruning() -> None:
    """Wait until this process's last write deleted the checkpoints beyond
    the newest ``KEEP`` (done on a helper thread after the write)."""
    if _pruner is not None:
        _pruner.join()


def list_checkpoints(ckpt_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoint files, newest first (after this
    process's pruning finished)."""
    wait_for_pruning()
    return catalog.scan(ckpt_dir)


def list_meta(ckpt_dir: str | os.PathLike[str]) -> list[CheckpointMeta]:
    """``catalog.list_meta`` after this process's pruning finished."""
    wait_for_pruning()
    return catalog.list_meta(ckpt_dir)


def load_latest(ckpt_dir: str | os.PathLike[str]) -> tuple[int, dict[str, Any]] | None:
    """The newest checkpoint that verifies, as ``(step, state)``; None when
    the directory holds no checkpoint. A corrupt one is refused with an
    error log naming it, and the previous one is tried.

    :raises CheckpointError: checkpoints exist but none verifies.
    """
    candidates = list_checkpoints(ckpt_dir)
    if not candidates:
        return None
    refused = []
    with lock(ckpt_dir):
        for step, path in candidates:
            try:
                state = deserialize(path.read_bytes(), str(path))
            except (CorruptCheckpointError, OSError) as exc:
                log.error("%s", exc)
                refused.append(str(exc))
                continue
            if refused:
                log.warning("using the previous checkpoint %s instead", path.name)
            return step, state
    raise CheckpointError(
        f"no valid checkpoint in {ckpt_dir}: " + "; ".join(refused))


def _prune_locked(directory: Path) -> None:
    if not directory.is_dir():
        return
    try:
        with lock(directory):
            _prune(directory)
    except OSError as exc:
        log.warning("cannot delete old checkpoints in %s: %s", directory, exc)


def _prune(directory: Path) -> None:
    for step, path in catalog.scan(directory)[KEEP:]:
        path.unlink(missing_ok=True)
        (directory / meta_name(step)).unlink(missing_ok=True)


def _remove_stale_temporaries(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.name.startswith(".ckpt-") and ".tmp." in entry.name:
            log.warning("removing a half-written checkpoint %s (its writer died)", entry.name)
            entry.unlink(missing_ok=True)
