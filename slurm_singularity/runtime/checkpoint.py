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

import concurrent.futures
import functools
import hashlib
import io
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import torch

from slurm_singularity import contract
from slurm_singularity.runtime.dirlock import fsync_dir, lock
from slurm_singularity.runtime.api import (
    CheckpointError, CheckpointMeta, CheckpointReason, CorruptCheckpointError,
)

log = logging.getLogger(__name__)

MAGIC = b"SSCKPT02\n"          # first bytes of every checkpoint file
END = b"SSCKEND\n"             # last bytes: a file without them is incomplete
TRAILER_LEN = 64 + 16 + 1 + len(END)
KEEP = 2
_CKPT_RE = re.compile(r"^ckpt-(\d{8,})\.pt$")


def ckpt_name(step: int) -> str:
    """File name of the checkpoint after ``step`` completed steps."""
    return f"ckpt-{step:08d}.pt"


class _HashingSink:
    """File-like object that ``torch.save`` streams into: each chunk is
    hashed and written as it comes, without an in-memory copy of the
    payload. A large chunk is hashed on a helper thread while the main
    thread writes it (both release the GIL); ``write`` returns only when
    both are done, because torch may reuse the buffer afterwards."""

    PARALLEL_BYTES = 1 << 16

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.length = 0
        self._hash = hashlib.sha256()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes >= self.PARALLEL_BYTES:
            hashing = _hash_pool().submit(self._hash.update, view)
            self.fh.write(view)
            hashing.result()
        else:
            self._hash.update(view)
            self.fh.write(view)
        self.length += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self.fh.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


@functools.lru_cache(maxsize=1)
def _hash_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-hash")


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
                sink = _HashingSink(fh)
                _save(state, sink)
                digest = sink.hexdigest()
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


def meta_name(step: int) -> str:
    return f"ckpt-{step:08d}.json"


def meta_to_json(meta: CheckpointMeta) -> dict[str, Any]:
    out = dict(meta.__dict__)
    out["reason"] = meta.reason.value
    return out


def meta_from_json(raw: dict[str, Any]) -> CheckpointMeta:
    """:raises ValueError: a field is missing or malformed (names it)."""
    try:
        return CheckpointMeta(
            step=int(raw["step"]), wall_time=float(raw["wall_time"]),
            devices=int(raw["devices"]), world_size=int(raw["world_size"]),
            reason=CheckpointReason(raw["reason"]), file=str(raw["file"]),
            bytes=int(raw["bytes"]), sha256=str(raw["sha256"]),
            write_s=float(raw.get("write_s", 0.0)))
    except KeyError as exc:
        raise ValueError(f"checkpoint metadata lacks field {exc.args[0]!r}") from None


def list_checkpoints(ckpt_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoint files, newest first."""
    wait_for_pruning()
    return _list(ckpt_dir)


def _list(ckpt_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    directory = Path(ckpt_dir)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _CKPT_RE.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry))
    return sorted(found, reverse=True)


def list_meta(ckpt_dir: str | os.PathLike[str]) -> list[CheckpointMeta]:
    """Metadata of the checkpoints kept in ``ckpt_dir``, newest first;
    unreadable metadata files are skipped with a warning."""
    metas = []
    for step, _ in list_checkpoints(ckpt_dir):
        path = Path(ckpt_dir) / meta_name(step)
        try:
            metas.append(meta_from_json(json.loads(path.read_text())))
        except (OSError, ValueError) as exc:
            log.warning("checkpoint metadata %s unreadable: %s", path, exc)
    return metas


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
    for step, path in _list(directory)[KEEP:]:
        path.unlink(missing_ok=True)
        (directory / meta_name(step)).unlink(missing_ok=True)


def _remove_stale_temporaries(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.name.startswith(".ckpt-") and ".tmp." in entry.name:
            log.warning("removing a half-written checkpoint %s (its writer died)", entry.name)
            entry.unlink(missing_ok=True)
