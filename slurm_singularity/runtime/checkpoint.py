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

    b"SSCKPT01" | sha256 hex (64 bytes) | payload length (16 decimal digits) | b"\\n" | payload

The payload is ``torch.save`` of a dict (see ``splice.Trainer``). Beside it
``ckpt-<step:08d>.json`` holds a ``CheckpointMeta`` for tools such as
``singularity-admin job show``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
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

MAGIC = b"SSCKPT01"
HEADER_LEN = len(MAGIC) + 64 + 16 + 1
KEEP = 2
_CKPT_RE = re.compile(r"^ckpt-(\d{8,})\.pt$")


def ckpt_name(step: int) -> str:
    """File name of the checkpoint after ``step`` completed steps."""
    return f"ckpt-{step:08d}.pt"


def serialize(state: dict[str, Any]) -> memoryview:
    """``state`` -> checkpoint file bytes (header + payload), without an
    extra copy of the payload."""
    buf = io.BytesIO()
    buf.write(b"\0" * HEADER_LEN)
    torch.save(state, buf)
    view = buf.getbuffer()
    payload = view[HEADER_LEN:]
    digest = hashlib.sha256(payload).hexdigest().encode()
    view[:HEADER_LEN] = MAGIC + digest + f"{len(payload):016d}".encode() + b"\n"
    return view


def deserialize(data: bytes | memoryview, name: str = "checkpoint") -> dict[str, Any]:
    """Checkpoint file bytes -> state.

    :raises CorruptCheckpointError: bad magic, truncated, checksum mismatch
        or an unreadable payload; the message names ``name``.
    """
    data = memoryview(data)
    if len(data) < HEADER_LEN or bytes(data[:len(MAGIC)]) != MAGIC:
        raise CorruptCheckpointError(
            f"checkpoint {name} is not a slurm-singularity checkpoint "
            f"(bad header, {len(data)} bytes); refusing it")
    header = bytes(data[:HEADER_LEN])
    digest = header[len(MAGIC):len(MAGIC) + 64].decode("ascii", "replace")
    try:
        length = int(header[len(MAGIC) + 64:HEADER_LEN - 1])
    except ValueError:
        raise CorruptCheckpointError(
            f"checkpoint {name} has a corrupt header (length field); refusing it") from None
    payload = data[HEADER_LEN:]
    if len(payload) != length:
        raise CorruptCheckpointError(
            f"checkpoint {name} is truncated or padded: payload is {len(payload)} bytes, "
            f"header says {length}; refusing it")
    actual = hashlib.sha256(payload).hexdigest()
    if actual != digest:
        raise CorruptCheckpointError(
            f"checkpoint {name} fails its checksum (sha256 {actual[:12]}..., header says "
            f"{digest[:12]}...): the file was modified or damaged; refusing it")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means corrupt
        raise CorruptCheckpointError(
            f"checkpoint {name} passes its checksum but cannot be loaded: {exc}") from exc


def write(ckpt_dir: str | os.PathLike[str], step: int, state: dict[str, Any], *,
          devices: int, world_size: int, reason: CheckpointReason) -> CheckpointMeta:
    """Write the checkpoint of ``step`` durably, then its metadata, then
    delete all but the newest ``KEEP`` checkpoints.

    :raises CheckpointError: the directory cannot be written.
    """
    directory = Path(ckpt_dir)
    started = time.time()
    data = serialize(state)
    delay = contract.ckpt_delay_s()
    name = ckpt_name(step)
    tmp = directory / f".{name}.tmp.{os.getpid()}"
    try:
        with lock(directory):
            _remove_stale_temporaries(directory)
            with open(tmp, "wb") as fh:
                half = len(data) // 2
                fh.write(data[:half])
                if delay:
                    fh.flush()
                    log.warning("checkpoint %s: testing delay of %.1f s (SINGULARITY_CKPT_DELAY_S)",
                                name, delay)
                    time.sleep(delay)
                fh.write(data[half:])
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, directory / name)
            meta = CheckpointMeta(
                step=step, wall_time=time.time(), devices=devices, world_size=world_size,
                reason=reason, file=name, bytes=len(data),
                sha256=bytes(data[len(MAGIC):len(MAGIC) + 64]).decode(),
                write_s=time.time() - started)
            meta_tmp = directory / f".{name}.json.tmp.{os.getpid()}"
            meta_tmp.write_text(json.dumps(meta_to_json(meta), sort_keys=True) + "\n")
            os.replace(meta_tmp, directory / meta_name(step))
            fsync_dir(directory)
            _prune(directory)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {name} in {directory}: {exc}") from exc
    log.info("checkpoint %s written (%s, %d bytes, %.3f s)", name, reason.value, len(data),
             meta.write_s)
    return meta


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


def _prune(directory: Path) -> None:
    for step, path in list_checkpoints(directory)[KEEP:]:
        path.unlink(missing_ok=True)
        (directory / meta_name(step)).unlink(missing_ok=True)


def _remove_stale_temporaries(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.name.startswith(".ckpt-") and ".tmp." in entry.name:
            log.warning("removing a half-written checkpoint %s (its writer died)", entry.name)
            entry.unlink(missing_ok=True)
