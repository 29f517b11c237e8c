"""The CRIU binary: where it is, whether it works, and its command lines.

Why here: one place knows CRIU's options. The command lines are built by
pure functions (tested without CRIU); ``run`` executes them with a timeout
so that a stuck CRIU fails the dump instead of hanging the job.

Options used, and why:
- ``--tcp-established --network-lock skip``: the ranks of a DDP job talk
  over TCP inside the tree; there is no iptables/nftables here to lock the
  network, and the whole tree is frozen at once, so nothing is in flight
  between a frozen and a running rank.
- ``--ext-unix-sk``: a job may hold a connected Unix socket to a daemon
  outside the tree (munge, nscd, journald).
- ``--file-locks``: a job's own flock()s are part of its state.
- dump ``--link-remap``: files open but unlinked (torch.multiprocessing's
  /dev/shm semaphores) are kept through a link in their directory.
- restore ``-d --restore-sibling``: the restored tree becomes a child of the
  keeper's guardian (which waits for it), not of CRIU.
- restore ``--inherit-fd fd[N]:pipe:[..]``: the tree's stdout and stderr
  pipes, whose other ends were the previous run's guardian, are replaced by
  new ones.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from slurm_singularity.transparent.api import MIN_CRIU_VERSION, SetupError, parse_criu_version

#: Where ``make setup`` (scripts/setup-criu.sh) installs the CRIU it builds.
BUILT_CRIU = Path("/usr/local/sbin/criu")

_COMMON = ("--unprivileged", "--tcp-established", "--ext-unix-sk", "--file-locks", "-v2")

#: Capabilities CRIU gets, as the job's user (ambient): enough to read and
#: recreate the user's own processes (net_admin: TCP repair mode for the
#: connections between DDP ranks), never another user's credentials.
CAPS = "+checkpoint_restore,+sys_ptrace,+net_admin"
#: Restore also: CRIU 4.2 records a deleted Unix socket's owner as root
#: (torch DataLoader workers' multiprocessing listeners in /tmp/pymp-*) and
#: chowns the socket it binds in its place to that owner; without chown it
#: fails ("Unable to change ... ownership (1001, 1001) to (0, 0)"). The
#: socket file is unlinked again at once (it was deleted when dumped).
RESTORE_CAPS = CAPS + ",+chown,+fowner"


def as_user(uid: int, gid: int, args: list[str], caps: str = CAPS) -> list[str]:
    """``args`` run as the job's user with ``caps`` only (unprivileged CRIU)."""
    return ["/usr/bin/setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups",
            f"--inh-caps={caps}", f"--ambient-caps={caps}", *args]


def in_namespaces(guardian_pid: int, args: list[str]) -> list[str]:
    """``args`` run in the PID and mount namespaces of the job's tree, whose
    PID 1 (the guardian) is ``guardian_pid`` on the node: CRIU then dumps
    the tree as processes of its own PID namespace (``tree.py``)."""
    return ["/usr/bin/nsenter", f"--target={guardian_pid}", "--pid", "--mount", "--", *args]


def find() -> Path:
    """A CRIU >= 4.1 that passes ``criu check``.

    :raises SetupError: none; the message says how to install one.
    """
    tried = []
    for cand in (BUILT_CRIU, shutil.which("criu", path="/usr/local/sbin:/usr/sbin:/usr/bin:/sbin")):
        if not cand or str(cand) in tried:
            continue
        tried.append(str(cand))
        path = Path(cand)
        if not os.access(path, os.X_OK):
            continue
        try:
            version = parse_criu_version(subprocess.run(
                [path, "--version"], capture_output=True, text=True, timeout=10).stdout)
            if version is None or version < MIN_CRIU_VERSION:
                continue
            check = subprocess.run([path, "check"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if check.returncode == 0:
            return path
    raise SetupError(
        "transparent mode needs CRIU >= 4.1 that passes `criu check` on every node "
        f"(tried: {', '.join(tried) or 'none found'}); an administrator installs it with "
        "`make setup` (docs/admin-guide.md, \"CRIU for transparent mode\")")


def dump_args(criu: Path, pid: int, images: str, *, leave_running: bool) -> list[str]:
    """``criu dump`` of the tree rooted at ``pid`` (the namespace's PID 1)."""
    args = [str(criu), "dump", "-t", str(pid), "-D", images, "-o", "dump.log",
            "--network-lock", "skip", "--link-remap", *_COMMON]
    if leave_running:
        args.append("--leave-running")
    return args


def restore_args(criu: Path, images: str, workdir: str, pidfile: str,
                 inherit: list[tuple[int, str]]) -> list[str]:
    """``criu restore`` detached, as a sibling (a child of its caller); its
    log goes to ``workdir``."""
    args = [str(criu), "restore", "-D", images, "-W", workdir, "-o", "restore.log", "-d",
            "--restore-sibling", "--pidfile", pidfile, *_COMMON]
    for fd, name in inherit:
        args += ["--inherit-fd", f"fd[{fd}]:{name}"]
    return args


def log_tail(path: str | os.PathLike[str], lines: int = 8) -> str:
    """The last error lines of a CRIU log, for a message."""
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    errors = [line for line in text if "Error" in line or "rror (" in line]
    return "\n".join((errors or text)[-lines:])
