"""The checkpoint directory's privacy: created 0700, refused when unsafe.

Why: a checkpoint holds the job's weights and decides what the job trains
from next. Created with the umask (0755 / 0644), other users read it; in a
shared sticky directory another user could pre-create the path a job will
use and plant a checkpoint there (issue 19, item 7). So every level the
runtime creates is made 0700 and every file 0600, whatever the umask; an
existing level is used only when it is owned by the job's user and not
writable by group or others. A level that belongs to someone else is
refused with a message naming it, never chmod-ed; a level of the user's own
that others may read but not write (an older runtime made them 0755) is
tightened to 0700 with a warning.

Which levels are judged: the checkpoint directory itself and those created
here; for the default path ``<base>/.singularity/ckpt/job-<id>`` also the
``.singularity`` and ``ckpt`` levels, which the runtime makes for every job
(the planting attack pre-creates them). Levels above belong to the site and
the user (a home, a group-writable project directory) and are not judged.

The start check (``prepare``) also writes, fsyncs and removes a probe file,
so that a directory that cannot be written is found before any work, not
at the first checkpoint after all of it. Apart from torch (the launcher and
``history`` use it).
"""

from __future__ import annotations

import logging
import os
import pwd
import socket
import stat
from pathlib import Path

from slurm_singularity.runtime.api import CheckpointDirError

log = logging.getLogger(__name__)

#: Levels between a job's base directory and its ``job-<id>`` directory in
#: the default layout (``launcher.default_ckpt_dir``).
DEFAULT_LEVELS = (".singularity", "ckpt")
DIR_MODE = 0o700
FILE_MODE = 0o600
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC

RULE = ("a checkpoint directory (each level the runtime creates) must be owned by the "
        "job's user and not writable by group or others")


def owner_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def unsafe_reason(st: os.stat_result, uid: int) -> str | None:
    """Why a directory or key file with status ``st`` cannot be trusted by
    user ``uid`` (pure); None when it can."""
    if st.st_uid != uid:
        return f"owned by {owner_name(st.st_uid)}, not by you ({owner_name(uid)})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "writable by group or others"
    return None


def describe(st: os.stat_result) -> str:
    return f"owner {owner_name(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):04o}"


def judged_levels(path: Path) -> list[Path]:
    """The existing levels of ``path`` that must be the user's: itself, and
    ``.singularity`` and ``ckpt`` above it in the default layout."""
    levels = [path]
    if (path.parent.name, path.parent.parent.name) == tuple(reversed(DEFAULT_LEVELS)):
        levels[:0] = [path.parent.parent, path.parent]
    return levels


def _create_missing(path: Path) -> set[Path]:
    """mkdir 0700 every missing level of ``path`` from the top; returns
    those this call created (a level another process created meanwhile is
    judged like any existing one)."""
    missing = []
    level = path
    while not os.path.lexists(level) and level != level.parent:
        missing.append(level)
        level = level.parent
    created = set()
    for level in reversed(missing):
        try:
            os.mkdir(level, DIR_MODE)      # the umask can only remove bits
        except FileExistsError:
            continue
        except OSError as exc:
            raise CheckpointDirError(
                f"cannot create checkpoint directory {level}: {exc.strerror}") from None
        if stat.S_IMODE(os.stat(level).st_mode) != DIR_MODE:
            os.chmod(level, DIR_MODE)      # an odd umask such as 0277
        created.add(level)
    return created


def _judge(level: Path, uid: int) -> None:
    """Refuse ``level`` unless it is the user's, not writable by others,
    and a directory; tighten a readable one to 0700.

    :raises CheckpointDirError: names the path, its owner and mode, the rule.
    """
    try:
        st = os.lstat(level)
        if stat.S_ISLNK(st.st_mode) and st.st_uid == uid:
            st = os.stat(level)            # the user's own link: judge its target
    except OSError as exc:
        raise CheckpointDirError(f"cannot examine checkpoint directory {level}: "
                                 f"{exc.strerror}") from None
    why = unsafe_reason(st, uid)
    if why is None and not stat.S_ISDIR(st.st_mode):
        why = "not a directory"
    if why is not None:
        raise CheckpointDirError(
            f"checkpoint directory {level} is {why} ({describe(st)}); refusing it: {RULE}. "
            f"Remove it or choose another directory (--ckpt-dir)")
    if stat.S_IMODE(st.st_mode) & 0o077:
        log.warning("checkpoint directory %s was mode %04o; made private (0700)", level,
                    stat.S_IMODE(st.st_mode))
        os.chmod(level, DIR_MODE)


def ensure_private(ckpt_dir: str | os.PathLike[str]) -> Path:
    """Create ``ckpt_dir`` (each missing level 0700) or verify it (see the
    module docstring); returns it as an absolute path.

    :raises CheckpointDirError: a level cannot be created, or is unsafe.
    """
    path = Path(os.path.abspath(ckpt_dir))
    uid = os.geteuid()
    levels = judged_levels(path)
    before = [level for level in levels if os.path.lexists(level)]
    for level in before:               # before creating anything inside them
        _judge(level, uid)
    created = _create_missing(path)
    for level in levels:               # made meanwhile by another process
        if level not in created and level not in before:
            _judge(level, uid)
    return path


def open_private(path: str | os.PathLike[str], *, truncate: bool = True) -> int:
    """A file descriptor of ``path`` opened for writing, created 0600 (an
    existing file, such as a recycled checkpoint, is made 0600 too).

    :raises OSError: as ``os.open``; a symbolic link is not followed.
    """
    fd = os.open(path, _FLAGS | (os.O_TRUNC if truncate else 0), FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def prepare(ckpt_dir: str | os.PathLike[str]) -> Path:
    """The start check of ``singularity-run``: ``ensure_private``, then
    write, fsync and remove a probe file.

    :raises CheckpointDirError: as ``ensure_private``, or the directory
        cannot be written (names it and the system's reason).
    """
    path = ensure_private(ckpt_dir)
    probe = path / f".probe.{socket.gethostname()}.{os.getpid()}"
    try:
        fd = open_private(probe)
        try:
            os.write(fd, b"probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CheckpointDirError(
            f"checkpoint directory {path} cannot be written: {exc.strerror}") from None
    return path
