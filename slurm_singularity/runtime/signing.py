"""The key that signs a user's checkpoints, and the signature.

Why: a checkpoint's checksum detects damage, not replacement; anyone who can
write a file of the right layout can recompute it (issue 19, item 7: a
checkpoint planted with a recomputed xxh3 checksum was restored and trained
from). So a checkpoint also carries an HMAC-SHA256, made with a key only the
job's user can read, over what identifies its contents: the format, the
step, the payload's length and its xxh3-128 digest. It is cheap: the payload
is still hashed once, and the HMAC covers about a hundred bytes.

What it rests on: a forger without the key must produce a payload with the
digest of a checkpoint the user signed. xxh3 is fast, not collision
resistant, so that checkpoint must also stay unreadable to others, which
the private directory ensures (``ckptdir``: 0700, files 0600). The MAC is
the second wall, not a replacement for the first.

The key: ``contract.ckpt_key_file()``, else
``~/.config/slurm-singularity/ckpt.key``: 32 random bytes, created 0600 in a
0700 directory on first use, atomically (a complete temporary file linked
into place, so two nodes creating it at once end up with one key). A key
file owned by another user, readable or writable by group or others, or not
32 bytes long is refused. Every node of a job must see the same key file (a
shared home does; else point ``SINGULARITY_CKPT_KEY`` at a shared path).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import stat
from pathlib import Path
from typing import Mapping

from slurm_singularity import contract
from slurm_singularity.runtime import ckptdir
from slurm_singularity.runtime.api import CheckpointDirError, CheckpointKeyError
from slurm_singularity.runtime.dirlock import fsync_dir

KEY_BYTES = 32
MAC_HEX = 64          # hex digits of an HMAC-SHA256

RULE = ("the checkpoint key must be a file of 32 bytes owned by you and readable by no "
        "one else (mode 0600)")

_cache: dict[str, bytes] = {}


def key_path(environ: Mapping[str, str] | None = None) -> Path:
    """``SINGULARITY_CKPT_KEY``, else ``~/.config/slurm-singularity/ckpt.key``."""
    explicit = contract.ckpt_key_file(environ)
    if explicit:
        return Path(os.path.abspath(os.path.expanduser(explicit)))
    return Path.home() / ".config" / "slurm-singularity" / "ckpt.key"


def load_key(environ: Mapping[str, str] | None = None) -> bytes:
    """The user's checkpoint key, created on first use (kept for the life
    of the process; workers forked after the launcher loaded it inherit it).

    :raises CheckpointKeyError: it cannot be created or read, or it is
        unsafe; the message names the file and the rule.
    """
    path = key_path(environ)
    found = _cache.get(str(path))
    if found is None:
        found = _cache[str(path)] = _read_or_create(path)
    return found


def mac(key: bytes, message: bytes) -> str:
    """HMAC-SHA256 of ``message`` under ``key``, hex."""
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def verify(key: bytes, message: bytes, expected_hex: str) -> bool:
    """Whether ``expected_hex`` is ``message``'s MAC under ``key``
    (constant-time comparison)."""
    return hmac.compare_digest(mac(key, message), expected_hex)


def _private_parent(path: Path) -> None:
    """Create the key's directory 0700 (and a missing ``~/.config``), or
    refuse it when another user owns it or others may write it."""
    if not path.parent.parent.exists():
        path.parent.parent.mkdir(mode=ckptdir.DIR_MODE, parents=True, exist_ok=True)
    try:
        os.mkdir(path.parent, ckptdir.DIR_MODE)
        return
    except FileExistsError:
        pass
    st = os.stat(path.parent)
    why = ckptdir.unsafe_reason(st, os.geteuid())
    if why is not None:
        raise CheckpointKeyError(
            f"directory of the checkpoint key {path.parent} is {why} "
            f"({ckptdir.describe(st)}); refusing it: {RULE}, in a directory only you "
            f"can write")


def _create(path: Path) -> None:
    tmp = path.parent / f".{path.name}.tmp.{socket.gethostname()}.{os.getpid()}"
    fd = ckptdir.open_private(tmp)
    try:
        os.write(fd, secrets.token_bytes(KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)          # fails if another process made it first
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _read_or_create(path: Path) -> bytes:
    try:
        if not path.exists():
            _private_parent(path)
            _create(path)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            why = ckptdir.unsafe_reason(st, os.geteuid())
            if why is None and stat.S_IMODE(st.st_mode) & 0o077:
                why = "readable by group or others"
            if why is None and (not stat.S_ISREG(st.st_mode) or st.st_size != KEY_BYTES):
                why = f"not a file of {KEY_BYTES} bytes ({st.st_size} bytes)"
            if why is not None:
                raise CheckpointKeyError(
                    f"checkpoint key {path} is {why} ({ckptdir.describe(st)}); refusing it: "
                    f"{RULE}. Remove it to have a new one made (checkpoints signed with it "
                    f"will then be refused), or set {contract.CKPT_KEY} to another file")
            key = os.read(fd, KEY_BYTES + 1)
        finally:
            os.close(fd)
    except (OSError, CheckpointDirError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise CheckpointKeyError(f"cannot create or read the checkpoint key {path}: "
                                 f"{reason}") from None
    if len(key) != KEY_BYTES:
        raise CheckpointKeyError(f"checkpoint key {path} changed while read; try again")
    return key
