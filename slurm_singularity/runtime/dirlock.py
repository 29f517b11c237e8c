"""The checkpoint directory's lock and durable-rename helpers.

Taking the lock makes the directory private first (``ckptdir``: created
0700, refused when another user owns it or others may write it), so no
path that writes or reads checkpoints can skip that check.

Kept apart from ``checkpoint`` (which needs torch) so that the launcher and
``history`` (and ``singularity-admin``) use them without importing torch.
"""

from __future__ import annotations

import os

import filelock

from slurm_singularity.runtime import ckptdir

LOCK_NAME = ".lock"


def lock(ckpt_dir: str | os.PathLike[str], timeout_s: float = 600.0) -> filelock.FileLock:
    """The directory's lock (held while writing, pruning, reading, appending
    history), after ``ckptdir.ensure_private``.

    :raises CheckpointDirError: the directory cannot be made or is unsafe.
    """
    path = ckptdir.ensure_private(ckpt_dir)
    return filelock.FileLock(str(path / LOCK_NAME), timeout=timeout_s, mode=ckptdir.FILE_MODE)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the renames inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
