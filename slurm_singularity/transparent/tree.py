"""The guardian: the job's process tree, started or restored outside Slurm's tree.

Why a guardian: Slurm (proctrack/linuxproc) sends its signals (preemption's
SIGTERM, ``scontrol requeue``, scancel) to every descendant of slurmstepd at
once, so an ordinary child tree would die before it could be dumped. The
keeper therefore forks the guardian twice (it is re-parented away from
slurmstepd) and only the keeper is signalled; it then dumps the tree.

The guardian (root) is PID 1 of a new PID namespace, with a mount
namespace of its own and a /proc of that PID namespace mounted in it. It
starts the user's command there as the job's user (from PID ``FIRST_PID`` on),
or has CRIU restore the tree there as its own child. The tree's PIDs are
then the namespace's, and a fresh namespace has them all free: a restore on
a node where the dumped PIDs are in use cannot collide with them. CRIU runs
as the job's user inside the namespace (``criu.in_namespaces``), so it sees
the tree as its own PID namespace's processes (it cannot dump or create PID
namespaces unprivileged) and the tree's /proc belongs to its namespace (the
parasite's "/proc doesn't belong to it" refusal). See docs/transparent.md,
"PID namespace", for what was tried and why this shape. Then the guardian:
- relays the tree's stdout and stderr pipes to the job's output files;
- reports on the status pipe: ``pid <host pid>``, then ``exit <code>`` or
  ``signal <n>`` when PID 1 ends (after the relays drained), or ``error <msg>``;
- kills the whole tree (SIGKILL to PID 1) when the keeper's control pipe
  closes: the keeper was killed, so nothing may outlive the job; and stays
  until then (its end would kill a CRIU still finishing in the namespace).
"""

from __future__ import annotations

import ctypes
import os
import pwd
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

PR_SET_NO_NEW_PRIVS = 38
#: Descriptors CRIU restore inherits (stdout pipe, stderr pipe, image
#: directory): high, so that they never land on one the guardian uses.
INHERIT_FDS = (1001, 1002, 1003)
#: Seconds the guardian waits for the rest of the tree after PID 1 ended.
ORPHANS_TIMEOUT_S = 5.0
PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 1 << 18
#: The user's command starts as this PID of the job's namespace: the PIDs
#: below it are left to CRIU and its helpers at a restore, which run in the
#: fresh namespace before the dumped PIDs are recreated.
FIRST_PID = 1001


@dataclass(frozen=True)
class Launch:
    """What the guardian starts: a new command, or a restore from an image."""

    uid: int
    gid: int
    cwd: str
    argv: tuple[str, ...]
    env: dict[str, str]
    #: Image to restore (a path CRIU can open), None to start ``argv``.
    restore_from: str | None = None
    #: With ``restore_from``: the dumped tree's stdout and stderr pipe names.
    old_pipes: tuple[str, str] = ("", "")
    criu: str = ""
    #: Root-private scratch directory (pidfile, restore log).
    scratch: str = ""


def pipe_name(fd: int) -> str:
    """How CRIU names the pipe of ``fd``: ``pipe:[<inode>]``."""
    return f"pipe:[{os.fstat(fd).st_ino}]"


def _relay(src: int, dst: int) -> None:
    while True:
        try:
            data = os.read(src, 65536)
        except InterruptedError:
            continue
        if not data:
            break
        try:
            os.write(dst, data)
        except OSError:
            pass
    os.close(src)


def _libc_call(name: str, *args: object) -> None:
    """A libc call that returns -1 on failure (Python 3.11 has no os.unshare).

    :raises OSError: it failed, naming the call.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def _own_proc() -> None:
    """In the guardian, PID 1 of the job's PID namespace: a mount namespace
    of its own (nothing propagates back to the node) with a /proc of this
    PID namespace, which the tree and CRIU see."""
    _libc_call("unshare", CLONE_NEWNS)
    _libc_call("mount", b"none", b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None)
    _libc_call("mount", b"proc", b"/proc", b"proc",
               ctypes.c_ulong(MS_NOSUID | MS_NODEV | MS_NOEXEC), None)


def _start(launch: Launch, out_w: int, err_w: int) -> int:
    """Start the command as the job's user, in its own session, with
    no_new_privs (no setuid program can raise it, and CRIU can restore a
    process whose bounding set it cannot trim: the restore runs unprivileged),
    as PID ``FIRST_PID`` of the namespace."""
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(FIRST_PID - 1))
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.closerange(3, 65536)
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
            os.setgroups(os.getgrouplist(pwd.getpwuid(launch.uid).pw_name, launch.gid))
            os.setgid(launch.gid)
            os.setuid(launch.uid)
            os.chdir(launch.cwd)
            os.execvpe(launch.argv[0], list(launch.argv), launch.env)
        except BaseException as exc:  # noqa: BLE001 - report and never return to the caller
            os.write(2, f"singularity: transparent: cannot start {launch.argv[0]}: {exc}\n"
                     .encode())
        os._exit(127)
    return pid


def _restore(launch: Launch, out_w: int, err_w: int) -> int:
    from slurm_singularity.transparent import criu
    pidfile = os.path.join(launch.scratch, "restore.pid")
    # CRIU inherits the new pipes' write ends and the image directory (opened
    # by root: the user cannot traverse ``transparent/``) as these fds.
    image_fd = os.open(launch.restore_from or "", os.O_RDONLY | os.O_DIRECTORY)
    fds = (out_w, err_w, image_fd)
    for fd, target in zip(fds, INHERIT_FDS):
        os.dup2(fd, target, inheritable=True)
    os.close(image_fd)
    out_fd, err_fd, dir_fd = INHERIT_FDS
    args = criu.as_user(launch.uid, launch.gid, criu.restore_args(
        Path(launch.criu), f"/proc/self/fd/{dir_fd}", launch.scratch, pidfile,
        [(out_fd, launch.old_pipes[0]), (err_fd, launch.old_pipes[1])]), criu.RESTORE_CAPS)
    try:
        done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, pass_fds=INHERIT_FDS, timeout=600)
    finally:
        for fd in INHERIT_FDS:
            os.close(fd)
    if done.returncode != 0:
        raise RuntimeError(f"criu restore failed (exit {done.returncode}): "
                           f"{criu.log_tail(os.path.join(launch.scratch, 'restore.log'))}")
    # The scratch directory is the user's (CRIU writes there as the user):
    # trust the pid only if it is our child (restored --restore-sibling),
    # never signal a process the user named.
    pid = int(Path(pidfile).read_text().strip())
    if pid <= 1 or _parent_of(pid) != os.getpid():
        raise RuntimeError(f"criu restore reported pid {pid}, which is not the restored tree")
    return pid


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """``pid``'s descendants, from /proc (children first-found order)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(b")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its process group (the job's session) and every
    descendant: nothing of the job may outlive it."""
    for target in [pid, *descendants(pid)]:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reap_until(pid: int) -> int:
    """Wait for ``pid``, reaping every orphan of the tree on the way (the
    guardian is their subreaper: a zombie keeps its PID, which a later
    restore needs free)."""
    while True:
        got, status = os.waitpid(-1, 0)
        if got == pid:
            break
    deadline = time.monotonic() + ORPHANS_TIMEOUT_S
    while time.monotonic() < deadline:   # the rest of the tree: killed with it
        try:
            got, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if got == 0:
            time.sleep(0.01)
    return status


def guardian(launch: Launch, status_w: int, ctl_r: int) -> None:
    """Body of the guardian process (never returns)."""
    code = 0
    try:
        os.setsid()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if launch.restore_from:
            # a /proc/<keeper>/fd/... path names the node's /proc, which the
            # namespace's replaces: hold the directory open across
            image_fd = os.open(launch.restore_from, os.O_RDONLY | os.O_DIRECTORY)
            launch = replace(launch, restore_from=f"/proc/self/fd/{image_fd}")
        _own_proc()
        # The pipes are the user's: CRIU, run as the user, reopens them.
        libc.setfsuid(launch.uid)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        libc.setfsuid(0)
        pid = (_restore if launch.restore_from else _start)(launch, out_w, err_w)
        os.close(out_w)
        os.close(err_w)
        names = (f"pipe:[{os.fstat(out_r).st_ino}]", f"pipe:[{os.fstat(err_r).st_ino}]")
        os.write(status_w, f"pid {pid} {names[0]} {names[1]}\n".encode())
        relays = [threading.Thread(target=_relay, args=(r, fd), daemon=True)
                  for r, fd in ((out_r, 1), (err_r, 2))]
        for t in relays:
            t.start()

        keeper_gone = threading.Event()

        def watch_keeper() -> None:
            while os.read(ctl_r, 1):
                pass
            kill_tree(pid)
            keeper_gone.set()
        threading.Thread(target=watch_keeper, daemon=True).start()
        status = _reap_until(pid)
        for t in relays:
            t.join(timeout=5)
        if os.WIFEXITED(status):
            os.write(status_w, f"exit {os.WEXITSTATUS(status)}\n".encode())
        else:
            os.write(status_w, f"signal {os.WTERMSIG(status)}\n".encode())
        # PID 1 ending kills every process of the namespace, a CRIU still
        # finishing the dump that ended the tree included: end with the keeper.
        keeper_gone.wait()
    except BaseException as exc:  # noqa: BLE001 - the keeper reads the reason
        try:
            os.write(status_w, f"error {' '.join(str(exc).split())}\n".encode())
        except OSError:
            pass
        code = 1
    os._exit(code)


def spawn(launch: Launch) -> tuple[int, int, int]:
    """Fork the guardian (twice: it must not be slurmstepd's descendant), as
    PID 1 of a new PID namespace. Returns (status pipe read end, control
    pipe write end, the guardian's PID on the node).

    :raises OSError: the namespace could not be made (the message says why).
    """
    status_r, status_w = os.pipe()
    ctl_r, ctl_w = os.pipe()
    pid_r, pid_w = os.pipe()
    first = os.fork()
    if first == 0:
        os.close(status_r)
        os.close(ctl_w)
        os.close(pid_r)
        try:
            _libc_call("unshare", CLONE_NEWPID)
            second = os.fork()
            if second == 0:
                os.close(pid_w)
                guardian(launch, status_w, ctl_r)
            os.write(pid_w, str(second).encode())
        except BaseException as exc:  # noqa: BLE001 - the keeper reads the reason
            os.write(pid_w, f"error cannot make the job's PID namespace: {exc}".encode())
        os._exit(0)
    os.close(pid_w)
    os.waitpid(first, 0)
    with os.fdopen(pid_r, "rb") as f:
        answer = f.read().decode()
    os.close(status_w)
    os.close(ctl_r)
    if not answer.isdigit():
        os.close(status_r)
        os.close(ctl_w)
        raise OSError(answer.removeprefix("error ") or "the guardian did not start")
    return status_r, ctl_w, int(answer)
