"""The one live policy: where ``policy apply`` installs it and how a reader
checks that it decides on the policy Slurm enforces.

``policy apply`` writes ``policy.toml`` beside the ``job_submit.lua`` and
``policy.conf`` it renders from it, and both of those carry the policy's
sha256 on a ``policy-sha256:`` line. The daemon, ``status`` and ``job
explain`` read that installed ``policy.toml`` by default; the daemon refuses
a policy whose sha256 is not the one in the installed ``job_submit.lua``,
because it would then shrink and preempt by tiers and quotas that Slurm's
own checks do not apply.

This is the policy package's only file I/O (the rest of ``policy/`` is pure):
atomic writes (temporary name, fsync, rename, fsync of the directory) and
their undo, used by ``cli/admin_policy.py``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .. import contract
from .api import Policy, PolicyError
from .render import INSTALLED_POLICY

#: The generated file whose hash line says which policy Slurm enforces.
ENFORCED_FILE = "job_submit.lua"
#: ``-- policy-sha256: HEX`` (job_submit.lua) or ``# policy-sha256: HEX`` (policy.conf).
HASH_LINE = re.compile(r"^(?:--|#) policy-sha256: ([0-9a-f]{64})$", re.MULTILINE)
#: Slurm's own configuration directory when ``$SLURM_CONF`` is not set.
SLURM_DEFAULT_CONF_DIR = Path("/etc/slurm")


class PolicyMismatch(PolicyError):
    """The policy a reader was given is not the one Slurm enforces (or
    Slurm enforces none that ``policy apply`` installed)."""


def conf_dir() -> Path:
    """Slurm's configuration directory: that of ``$SLURM_CONF``, else Slurm's default."""
    conf = contract.slurm_conf()
    return Path(conf).parent if conf else SLURM_DEFAULT_CONF_DIR


def installed_policy_path(directory: Path | None = None) -> Path:
    """Where ``policy apply`` installs the policy: ``policy.toml`` beside
    slurm.conf (``directory``, default ``conf_dir()``)."""
    return (directory or conf_dir()) / INSTALLED_POLICY


def hash_in(text: str) -> str | None:
    """The sha256 on the ``policy-sha256:`` line of a generated file, or None."""
    m = HASH_LINE.search(text)
    return m.group(1) if m else None


def check_enforced(policy: Policy, policy_path: Path, directory: Path | None = None) -> None:
    """Refuse ``policy`` (read from ``policy_path``) unless it is the policy
    that the installed ``job_submit.lua`` in ``directory`` was generated from.

    :raises PolicyMismatch: naming both files and both hashes, and what to run.
    """
    directory = directory or conf_dir()
    enforced = directory / ENFORCED_FILE
    installed = installed_policy_path(directory)
    try:
        enforced_hash = hash_in(enforced.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyMismatch(
            f"cannot read {enforced}, which says which policy Slurm enforces "
            f"({getattr(exc, 'strerror', None) or exc}); install the policy with "
            f"`singularity-admin policy apply {policy_path}`", path=str(policy_path)) from None
    if enforced_hash is None:
        raise PolicyMismatch(
            f"{enforced} has no policy-sha256 line: it was not installed by "
            f"`singularity-admin policy apply`, so nothing says which policy Slurm enforces; "
            f"run `singularity-admin policy apply {policy_path}`", path=str(policy_path))
    if policy.sha256 != enforced_hash:
        raise PolicyMismatch(
            f"sha256 {(policy.sha256 or 'none')[:12]} differs from the policy Slurm enforces: "
            f"{enforced} was generated from sha256 {enforced_hash[:12]} (installed as "
            f"{installed}); run `singularity-admin policy apply {policy_path}` or start on "
            f"{installed}", path=str(policy_path))


class LivePolicy:
    """The policy at ``policy_path`` as long as Slurm enforces it, re-read
    when it or the installed ``job_submit.lua`` changes (a running daemon
    follows a ``policy apply`` without a restart, and stops acting while the
    two disagree, e.g. between ``policy apply`` writing one and the other)."""

    def __init__(self, policy_path: Path, directory: Path | None = None) -> None:
        self.policy_path = policy_path
        self.directory = directory or conf_dir()
        self._seen: tuple[int, int] | None = None
        self._result: Policy | PolicyError | None = None

    def _stamp(self) -> tuple[int, int]:
        def mtime(path: Path) -> int:
            try:
                return path.stat().st_mtime_ns
            except OSError:
                return -1
        return mtime(self.policy_path), mtime(self.directory / ENFORCED_FILE)

    def current(self) -> Policy:
        """The live policy (read again only when a file changed).

        :raises PolicyError: it does not load, or Slurm enforces another
            (``PolicyMismatch``, naming both files).
        """
        from .load import load_policy

        stamp = self._stamp()
        if stamp != self._seen or self._result is None:
            self._seen = stamp
            try:
                policy = load_policy(self.policy_path)
                check_enforced(policy, self.policy_path, self.directory)
                self._result = policy
            except PolicyError as exc:
                self._result = exc
        if isinstance(self._result, PolicyError):
            raise self._result
        return self._result


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path``: temporary name, fsync, chmod, rename."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install(files: dict[str, str], directory: Path) -> dict[str, str | None]:
    """Write ``files`` into ``directory`` atomically, one by one; returns the
    previous contents (None = the file did not exist) for ``restore``.

    :raises OSError: a file could not be read or written; the files written
        before it have been put back.
    """
    previous: dict[str, str | None] = {}
    for name in files:
        path = directory / name
        previous[name] = path.read_text(encoding="utf-8") if path.exists() else None
    written: dict[str, str | None] = {}
    try:
        for name, text in files.items():
            written[name] = previous[name]
            write_atomic(directory / name, text)
        fsync_dir(directory)
    except OSError:
        restore(written, directory)
        raise
    return previous


def restore(previous: dict[str, str | None], directory: Path) -> None:
    """Undo ``install``: put back each previous text, remove each new file."""
    for name, text in previous.items():
        if text is None:
            (directory / name).unlink(missing_ok=True)
        else:
            write_atomic(directory / name, text)
    fsync_dir(directory)
