"""The checkpoint directory's lock and durable-rename helpers.

Kept apart from ``checkpoint`` (which needs torch) so that the launcher and
``history`` (and ``singularity-admin``) use them without importing torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import filelock

LOCK_NAME = ".lock"


def lock(ckpt_dir: str | os.PathLike[str], timeout_s: float = 600.0) -> filelock.FileLock:
    """The directory's lock (held while writing, pruning, reading, appending
    history)."""
    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(str(Path(ckpt_dir) / LOCK_NAME), timeout=timeout_s)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the renames inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
