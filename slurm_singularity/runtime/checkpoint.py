"""Checkpoint files: atomic, checksummed, signed, private, the last two kept.

Why so: a job is preempted with a grace time and then killed, and a node can
die at any moment, so a checkpoint must be either complete and verified or
ignored. A checkpoint is written to a temporary file, fsynced, renamed into
place and the directory fsynced; its trailer carries the checksum and length
of the payload so that a truncated or bit-flipped file is refused with a clear
message and the previous one (the last two are kept) is used instead. A
``filelock`` guards the directory against a second writer (a requeued job
whose old incarnation is still flushing).

File layout of ``ckpt-<step:08d>.pt`` (format 04)::

    b"SSCKPT04\\n" | payload | xxh3-128 hex of payload (32) | payload length
    (16 decimal digits) | step (16 decimal digits) | MAC (64 hex) | b"\\n" |
    b"SSCKEND\\n"

The MAC is ``signing``'s HMAC-SHA256, under the user's key, of the magic,
step, length and digest: restore refuses a checkpoint it does not verify
(planted, altered, renamed to another step, another user's) as it refuses a
damaged one, and falls back to the previous one. The directory and its
files are private (``ckptdir``: 0700 and 0600 whatever the umask).
Checkpoints of the formats before (02, 03) are unsigned: they cannot be
told apart from planted ones, so restore refuses them unless
``SINGULARITY_CKPT_ACCEPT_UNSIGNED=1`` (``contract.ckpt_accept_unsigned``)
says the user trusts them; the next checkpoint is signed.

The payload is ``stateformat``'s: a JSON header, then the tensors' bytes,
written from the tensors' own memory with a few ``os.writev`` calls. The
checksum is a trailer, so a file cut short lacks it and is refused.
xxh3-128 rather than sha256: the checksum guards against torn writes and
damaged media, not against an attacker (the MAC is for that), and at about
30 GB/s it costs 1 ms on a 40 MB checkpoint where sha256 cost 23 ms, more
than half of what writing the bytes costs (``bench/checkpoint.py``). Files
of format 02 (a ``torch.save`` payload, sha256 of 64 hex digits) can still
be read, with the same option. Beside it ``ckpt-<step:08d>.json``
holds a ``CheckpointMeta`` for tools such as ``singularity-admin job show``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import xxhash

from slurm_singularity import contract
from slurm_singularity.runtime import catalog, signing, stateformat
from slurm_singularity.runtime.catalog import ckpt_name, meta_name, meta_to_json
from slurm_singularity.runtime.ckptdir import open_private
from slurm_singularity.runtime.dirlock import fsync_dir, lock
from slurm_singularity.runtime.api import (
    CheckpointError, CheckpointMeta, CheckpointReason, CorruptCheckpointError,
    UntrustedCheckpointError,
)

log = logging.getLogger(__name__)

MAGIC = b"SSCKPT04\n"          # first bytes of every checkpoint file written now
END = b"SSCKEND\n"             # last bytes: a file without them is incomplete
ALGORITHM = "xxh3_128"
KEEP = 2
SPARE = ".ckpt-spare"          # a retired checkpoint, overwritten by the next write


class _Format:
    """What a format's magic implies for its trailer."""

    def __init__(self, number: str, algorithm: str, new_hash: Callable[..., Any],
                 hex_len: int, signed: bool) -> None:
        self.number = number
        self.algorithm = algorithm
        self.new_hash = new_hash
        self.hex_len = hex_len
        self.signed = signed
        self.trailer_len = hex_len + 16 + (_SIGNATURE_LEN if signed else 0) + 1 + len(END)


_SIGNATURE_LEN = 16 + signing.MAC_HEX      # step, MAC

FORMATS = {
    MAGIC: _Format("04", ALGORITHM, xxhash.xxh3_128, 32, signed=True),
    b"SSCKPT03\n": _Format("03", ALGORITHM, xxhash.xxh3_128, 32, signed=False),
    b"SSCKPT02\n": _Format("02", "sha256", hashlib.sha256, 64, signed=False),
}
_CURRENT = FORMATS[MAGIC]


_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def _write_all(fd: int, buffers: list[Any]) -> None:
    """``os.writev`` of every buffer, in batches of at most IOV_MAX and
    again after a short write."""
    pending = [memoryview(b).cast("B") for b in buffers]
    while pending:
        batch = pending[:_IOV_MAX]
        done = os.writev(fd, batch)
        while batch and done >= batch[0].nbytes:
            done -= batch[0].nbytes
            batch.pop(0)
            pending.pop(0)
        if done:
            pending[0] = pending[0][done:]


def _signed_fields(digest: str, length: int, step: int) -> bytes:
    """What the MAC covers, as the trailer holds it (bar the MAC)."""
    return digest.encode() + f"{length:016d}{step:016d}".encode()


def _trailer(digest: str, length: int, step: int, key: bytes) -> bytes:
    fields = _signed_fields(digest, length, step)
    return fields + signing.mac(key, MAGIC + fields).encode() + b"\n" + END


def _encode(state: dict[str, Any]) -> tuple[list[Any], int]:
    """``state`` -> (buffers of the payload in order, payload length). The
    buffers view the state's own tensor memory (no copy)."""
    try:
        encoded = stateformat.encode(state)
    except stateformat.StateFormatError as exc:
        raise CheckpointError(f"cannot checkpoint this state: {exc}") from None
    return [encoded.head, *encoded.buffers], encoded.nbytes


def _checksum(buffers: list[Any]) -> str:
    digest = _CURRENT.new_hash()
    for buf in buffers:
        digest.update(buf)
    return digest.hexdigest()


class _ChecksumThread(threading.Thread):
    """Hashes the payload while the main thread writes it (xxhash and the
    ``write`` system call both release the GIL)."""

    def __init__(self, buffers: list[Any]) -> None:
        super().__init__(name="ckpt-checksum")
        self.buffers = buffers
        self.digest = ""

    def run(self) -> None:
        self.digest = _checksum(self.buffers)


def serialize(state: dict[str, Any], step: int = 0) -> bytes:
    """``state`` -> checkpoint file bytes (magic, payload, trailer signed
    with the user's key): what ``write`` puts in the file for ``step``.

    :raises CheckpointKeyError: the key cannot be had (``signing.load_key``).
    """
    buffers, length = _encode(state)
    key = signing.load_key()
    return b"".join([MAGIC, *buffers, _trailer(_checksum(buffers), length, step, key)])


def deserialize(data: bytes | memoryview, name: str = "checkpoint", *,
                step: int | None = None, accept_unsigned: bool | None = None) -> dict[str, Any]:
    """Checkpoint file bytes -> state, after verifying its MAC with the
    user's key and that it is the checkpoint of ``step`` (when given).

    :raises UntrustedCheckpointError: unsigned (unless ``accept_unsigned``,
        default ``contract.ckpt_accept_unsigned()``), not signed with the
        user's key, or signed for another step; the message says so.
    :raises CorruptCheckpointError: bad magic, truncated, checksum mismatch
        or an unreadable payload; the message names ``name``.
    :raises CheckpointKeyError: the user's key cannot be had.
    """
    data = memoryview(data)
    fmt = FORMATS.get(bytes(data[:len(MAGIC)]))
    if fmt is None:
        raise CorruptCheckpointError(
            f"checkpoint {name} is not a slurm-singularity checkpoint "
            f"(bad header, {len(data)} bytes); refusing it")
    if len(data) < len(MAGIC) + fmt.trailer_len or bytes(data[-len(END):]) != END:
        raise CorruptCheckpointError(
            f"checkpoint {name} is truncated or incomplete (its trailer is missing, "
            f"{len(data)} bytes); refusing it")
    trailer = bytes(data[-fmt.trailer_len:])
    if fmt.signed:
        _verify_signature(trailer, fmt, name, step)
    elif not (contract.ckpt_accept_unsigned() if accept_unsigned is None else accept_unsigned):
        raise UntrustedCheckpointError(
            f"checkpoint {name} is unsigned (format {fmt.number}, written before checkpoints "
            f"were signed), so it cannot be told apart from a planted one; refusing it. If "
            f"you wrote it, resume once with {contract.CKPT_ACCEPT_UNSIGNED}=1 (its next "
            f"checkpoint is signed), or delete it to start over")
    digest = trailer[:fmt.hex_len].decode("ascii", "replace")
    try:
        length = int(trailer[fmt.hex_len:fmt.hex_len + 16])
    except ValueError:
        raise CorruptCheckpointError(
            f"checkpoint {name} has a corrupt trailer (length field); refusing it") from None
    payload = data[len(MAGIC):len(data) - fmt.trailer_len]
    if len(payload) != length:
        raise CorruptCheckpointError(
            f"checkpoint {name} is truncated or padded: payload is {len(payload)} bytes, "
            f"its trailer says {length}; refusing it")
    actual = fmt.new_hash(payload).hexdigest()
    if actual != digest:
        raise CorruptCheckpointError(
            f"checkpoint {name} fails its checksum ({fmt.algorithm} {actual[:12]}..., trailer says "
            f"{digest[:12]}...): the file was modified or damaged; refusing it")
    try:
        if fmt.algorithm == ALGORITHM:
            return stateformat.decode(payload)
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoding failure means corrupt
        raise CorruptCheckpointError(
            f"checkpoint {name} passes its checksum but cannot be loaded: {exc}") from exc


def _verify_signature(trailer: bytes, fmt: _Format, name: str, step: int | None) -> None:
    """:raises UntrustedCheckpointError: the MAC does not verify with the
    user's key, or the checkpoint was signed for another step."""
    fields = trailer[:fmt.hex_len + 32]
    given = trailer[fmt.hex_len + 32:fmt.hex_len + 32 + signing.MAC_HEX].decode("ascii", "replace")
    if not signing.verify(signing.load_key(), MAGIC + fields, given):
        raise UntrustedCheckpointError(
            f"checkpoint {name} is not signed with your checkpoint key "
            f"({signing.key_path()}): it was planted, altered, or written by another user "
            f"or with another key; refusing it")
    signed_step = int(fields[fmt.hex_len + 16:])
    if step is not None and signed_step != step:
        raise UntrustedCheckpointError(
            f"checkpoint {name} was signed as the checkpoint of step {signed_step}, not "
            f"{step}: it was renamed or copied; refusing it")


def write(ckpt_dir: str | os.PathLike[str], step: int, state: dict[str, Any], *,
          devices: int, world_size: int, reason: CheckpointReason) -> CheckpointMeta:
    """Write the checkpoint of ``step`` durably (write the payload to a
    temporary file while a helper thread hashes it, trailer, one fsync,
    rename), then its metadata, fsync the
    directory, and delete all but the newest ``KEEP`` checkpoints.

    :raises CheckpointError: the directory cannot be written.
    """
    wait_for_pruning()
    directory = Path(ckpt_dir)
    started = time.time()
    delay = contract.ckpt_delay_s()
    name = ckpt_name(step)
    tmp = directory / f".{name}.tmp.{os.getpid()}"
    buffers, length = _encode(state)    # refuses what it cannot store
    key = signing.load_key()
    try:
        with lock(directory):
            _remove_stale_temporaries(directory)
            with _open_recycled(directory, tmp) as fh:
                checksum = _ChecksumThread(buffers)
                checksum.start()
                try:
                    _write_all(fh.fileno(), [MAGIC, *buffers])
                finally:
                    checksum.join()
                digest = checksum.digest
                if delay:
                    log.warning("checkpoint %s: testing delay of %.1f s (SINGULARITY_CKPT_DELAY_S)",
                                name, delay)
                    time.sleep(delay)
                _write_all(fh.fileno(), [_trailer(digest, length, step, key)])
                size = fh.tell()
                fh.truncate(size)        # a recycled file may have been longer
                os.fsync(fh.fileno())
            os.replace(tmp, directory / name)
            meta = CheckpointMeta(
                step=step, wall_time=time.time(), devices=devices, world_size=world_size,
                reason=reason, file=name, bytes=size, checksum=f"{ALGORITHM}:{digest}",
                write_s=time.time() - started)
            meta_tmp = directory / f".{name}.json.tmp.{os.getpid()}"
            fd = open_private(meta_tmp)
            with open(fd, "w", encoding="utf-8") as meta_fh:
                meta_fh.write(json.dumps(meta_to_json(meta), sort_keys=True) + "\n")
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
    the directory holds no checkpoint. A corrupt or untrusted one (see
    ``deserialize``) is refused with an error log naming it, and the
    previous one is tried.

    :raises CheckpointError: checkpoints exist but none verifies.
    """
    candidates = list_checkpoints(ckpt_dir)
    if not candidates:
        return None
    refused = []
    with lock(ckpt_dir):
        for step, path in candidates:
            try:
                state = deserialize(path.read_bytes(), str(path), step=step)
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


def _open_recycled(directory: Path, tmp: Path) -> Any:
    """Open ``tmp`` for writing: the spare file renamed to it when there is
    one (overwritten in place, not truncated first), else a new file.

    Why: writing over blocks the file system already allocated is faster
    than allocating new ones and freeing the old (14 ms against 22 ms for
    40 MB written and fsynced on the development machine), as PostgreSQL
    recycles its WAL segments. The cost is disk: the directory holds
    ``KEEP`` checkpoints and one spare."""
    try:
        os.replace(directory / SPARE, tmp)
    except FileNotFoundError:
        return open(open_private(tmp), "wb", buffering=0)
    return open(open_private(tmp, truncate=False), "wb", buffering=0)  # fd: no truncation


def _retire(directory: Path, path: Path) -> None:
    """Keep ``path`` as the spare when there is none, else delete it."""
    if (directory / SPARE).exists():
        path.unlink(missing_ok=True)
    else:
        os.replace(path, directory / SPARE)


def _prune(directory: Path) -> None:
    for step, path in catalog.scan(directory)[KEEP:]:
        (directory / meta_name(step)).unlink(missing_ok=True)
        _retire(directory, path)


def _remove_stale_temporaries(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.name.startswith(".ckpt-") and ".pt.tmp." in entry.name:
            log.warning("removing a half-written checkpoint %s (its writer died)", entry.name)
            _retire(directory, entry)
        elif entry.name.startswith(".ckpt-") and ".tmp." in entry.name:
            entry.unlink(missing_ok=True)
