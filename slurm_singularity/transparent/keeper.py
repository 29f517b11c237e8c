"""The keeper: what a transparent job's batch task becomes (root, one per run).

Why root and why here: the keeper must outlive Slurm's signals to the job,
hand CRIU the capabilities it needs, and sign images with a key the user
cannot read; slurmstepd is where Slurm already has root. The SPANK plugin
(``spank/transparent.c``) forks it from the batch task in
``slurm_spank_task_init_privileged`` and execs this module with a clean
environment; the task, once it is the user's, hands over its stdio and
environment (on a socket; the environment reaches the command only) and
forwards Slurm's signals. Nothing of the user's reaches root's Python
(``python -I``: no PYTHONPATH, no user site). CRIU itself runs as the job's
user (``criu.as_user``).

One run:
1. refuse what cannot work (several nodes, no working CRIU), naming why;
2. restore the newest image that verifies (``images.newest_good``), else
   start the command (``tree.spawn``);
3. wait: the command's end is the job's end (its exit code, images
   removed); the preemption signal (SIGTERM from Slurm's preemption,
   ``scontrol requeue``, scancel; or the tier's signal) dumps the tree,
   publishes the image and exits with the requeue code; every
   ``--ckpt-every`` seconds a dump leaves the tree running.
If the keeper itself is killed (SIGKILL after the grace time), the guardian
sees its control pipe close and kills the tree; a dump it left half-done is
a temporary directory that is never restored and is removed later.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from slurm_singularity import contract
from slurm_singularity.runtime import ckptdir
from slurm_singularity.runtime.launcher import default_ckpt_dir
from slurm_singularity.transparent import criu, history, images, store, tree
from slurm_singularity.transparent.api import (
    DEFAULT_KEY_FILE, IMAGES_SUBDIR, DumpFailed, Manifest, SetupError, Settings,
    TransparentError, user_environment)

log = logging.getLogger(__name__)

#: Exit code of a run refused before anything started (bad set-up).
SETUP_FAILED_EXIT = 1
#: Seconds CRIU may take for one dump before it counts as failed.
DUMP_TIMEOUT_S = 300.0
#: File of the checkpoint directory that records runs and dumps (JSON lines,
#: the user's, read by ``singularity-admin job show``).
HISTORY = history.FILE
#: The batch script as the tree runs it (see ``Keeper._stable_script``).
SCRIPT_COPY = "transparent-script"


class Keeper:
    """One run of a transparent job (see the module docstring)."""

    def __init__(self, settings: Settings, argv: list[str], env: dict[str, str],
                 cwd: str) -> None:
        self.s = settings
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.prefix = f"[job {settings.job_id}] transparent:"
        #: The Slurm node (slurmd's name: several share one host here).
        self.node = env.get("SLURMD_NODENAME") or socket.gethostname()
        self.stop_signal: int | None = None
        #: The tree's root, as a PID of its namespace (CRIU runs there).
        self.pid = 0
        #: The guardian (PID 1 of the tree's namespace) as a PID of the node.
        self.guardian_pid = 0
        self.pipes = ("", "")
        self.criu = Path()
        self.images_fd = -1
        self.ckpt_fd = -1

    # -- set-up ----------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        """The checkpoint directory (made and judged as the user, 0700), and
        the root-private ``transparent/`` inside, held open by fd so that
        renames by the user cannot redirect root's writes."""
        child = os.fork()
        if child == 0:
            code = 0
            try:
                os.setgroups([])
                os.setgid(self.s.gid)
                os.setuid(self.s.uid)
                ckptdir.ensure_private(self.s.ckpt_dir)
            except BaseException as exc:  # noqa: BLE001 - reported through the exit code
                sys.stderr.write(f"singularity: {self.prefix.split(' ', 2)[2]} {exc}\n")
                code = 1
            os._exit(code)
        _, status = os.waitpid(child, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SetupError(f"checkpoint directory {self.s.ckpt_dir} is unusable (see above)")
        self.ckpt_fd = os.open(self.s.ckpt_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        st = os.fstat(self.ckpt_fd)
        if st.st_uid != self.s.uid:
            raise SetupError(f"checkpoint directory {self.s.ckpt_dir} belongs to "
                             f"{ckptdir.owner_name(st.st_uid)}, not to the job's user")
        try:
            os.mkdir(IMAGES_SUBDIR, 0o700, dir_fd=self.ckpt_fd)
        except FileExistsError:
            pass
        self.images_fd = os.open(IMAGES_SUBDIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                 dir_fd=self.ckpt_fd)
        st = os.fstat(self.images_fd)
        if st.st_uid != 0 or stat.S_IMODE(st.st_mode) & 0o077:
            raise SetupError(f"{self.s.images_dir} is not root's and private "
                             f"({ckptdir.describe(st)}); remove it")

    def _stable_script(self) -> str:
        """A copy of the batch script in the checkpoint directory (the user's,
        0700). Slurm's copy lives in the node's spool and is gone after a
        requeue, but the shell holds it open, and CRIU reopens it by path at
        restore, on whichever node."""
        with open(self.argv[0], "rb") as f:
            body = f.read()
        try:
            os.unlink(SCRIPT_COPY, dir_fd=self.ckpt_fd)
        except FileNotFoundError:
            pass
        fd = os.open(SCRIPT_COPY, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o700,
                     dir_fd=self.ckpt_fd)
        try:
            os.write(fd, body)
            os.fchown(fd, self.s.uid, self.s.gid)
            os.fsync(fd)
        finally:
            os.close(fd)
        return str(self.s.ckpt_dir / SCRIPT_COPY)

    @property
    def images_dir(self) -> Path:
        """``transparent/`` through the fd held open: immune to renames."""
        return Path(f"/proc/{os.getpid()}/fd/{self.images_fd}")

    def record(self, event: str, **fields: object) -> None:
        """Append one line to the user's history file (never fails the job)."""
        line = json.dumps({"event": event, "time": round(time.time(), 3),
                           "node": self.node, **fields}) + "\n"
        try:
            fd = os.open(HISTORY, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW,
                         0o600, dir_fd=self.ckpt_fd)
            try:
                st = os.fstat(fd)
                # root writes here: never into a file the user linked in
                # (a hard link to a file of root's), only into the user's
                # own plain file or the empty one just made
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or not (
                        st.st_uid == self.s.uid or (st.st_uid == 0 and st.st_size == 0)):
                    raise OSError(f"{HISTORY} is not the user's plain file; not written")
                if st.st_uid == 0:
                    os.fchown(fd, self.s.uid, self.s.gid)
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("%s cannot record %s: %s", self.prefix, event, exc)

    # -- a run -----------------------------------------------------------------

    def run(self) -> int:
        if contract.slurm_nnodes(self.env) > 1:
            raise SetupError("--transparent supports single-node jobs only: CRIU dumps the "
                             "process tree of one node, and a consistent cut across nodes "
                             "(freezing every node's tree before any is dumped) is not "
                             "implemented; submit with --nodes=1")
        self.criu = criu.find()
        self._prepare_dirs()
        key = images.load_key(DEFAULT_KEY_FILE)
        scratch = tempfile.mkdtemp(prefix=f"singularity-transparent-{self.s.job_id}-")
        os.chown(scratch, self.s.uid, self.s.gid)
        env = user_environment(self.env)
        images.clear_staging(self.s.job_id)
        found = images.newest_good(self.images_dir, key, job_id=self.s.job_id, uid=self.s.uid,
                                   gid=self.s.gid)
        argv = tuple(self.argv) if found else (self._stable_script(), *self.argv[1:])
        launch = tree.Launch(uid=self.s.uid, gid=self.s.gid, cwd=self.cwd,
                             argv=argv, env=env, criu=str(self.criu), scratch=scratch)
        if found is not None:
            path, manifest, files = found
            launch = tree.Launch(**{**vars(launch), "restore_from": str(files),
                                    "old_pipes": manifest.pipes})
            log.info("%s restoring %s (dumped on %s at %s)", self.prefix, path.name,
                     manifest.node, time.strftime("%H:%M:%S", time.localtime(manifest.time)))
        t0 = time.monotonic()
        try:
            status_r, ctl_w, self.guardian_pid = tree.spawn(launch)
            reader = _Lines(status_r)
            first = reader.next(timeout=600)
        finally:
            if found is not None:
                images.discard(found[2])       # CRIU has read it (or failed)
        if first is None or not first.startswith("pid "):
            raise SetupError(f"the job's process tree did not start: {first or 'no answer'}")
        _, pid, out_pipe, err_pipe = first.split(" ", 3)
        self.pid, self.pipes = int(pid), (out_pipe, err_pipe)
        if found is not None:
            self.record("restore", image=found[0].name, restore_s=round(time.monotonic() - t0, 3))
            log.info("%s restored in %.2f s", self.prefix, time.monotonic() - t0)
            try:
                images.prune(self.images_dir, found[0].name, self.s.keep)
            except OSError as exc:
                log.warning("%s removing older images failed: %s", self.prefix, exc)
        else:
            self.record("start")
        return self._wait(reader, key)

    def _wait(self, reader: "_Lines", key: bytes) -> int:
        next_dump = (time.monotonic() + self.s.ckpt_every_s) if self.s.ckpt_every_s else None
        while True:
            if self.stop_signal is not None:
                return self._preempt(reader, key)
            timeout = 0.2
            line = reader.next(timeout=timeout)
            if line is not None:
                if line.startswith("exit "):
                    code = int(line.split()[1])
                    self.record("exit", code=code)
                    return code
                if line.startswith("signal "):
                    sig = int(line.split()[1])
                    self.record("exit", signal=sig)
                    return 128 + sig
                if line.startswith("error "):
                    raise TransparentError(line[6:])
            if reader.eof:
                raise TransparentError("the guardian of the job's process tree died")
            if next_dump is not None and time.monotonic() >= next_dump:
                try:
                    self.dump(key, reason="periodic", leave_running=True)
                except DumpFailed as exc:
                    log.warning("%s periodic dump failed, the previous image stays: %s",
                                self.prefix, exc)
                next_dump = time.monotonic() + (self.s.ckpt_every_s or 0)

    def _preempt(self, reader: "_Lines", key: bytes) -> int:
        log.info("%s signal %s: dumping the process tree", self.prefix, self.stop_signal)
        try:
            self.dump(key, reason="preempt", leave_running=False)
        except DumpFailed as exc:
            log.error("%s dump failed, the previous image (if any) is used next: %s",
                      self.prefix, exc)
            tree.kill_tree(self.guardian_pid)     # PID 1: the whole namespace
            reader.next(timeout=10)
            return contract.REQUEUE_EXIT_CODE
        reader.next(timeout=10)          # "signal 9": CRIU ended the tree
        return contract.REQUEUE_EXIT_CODE

    def dump(self, key: bytes, *, reason: str, leave_running: bool) -> Manifest:
        """Dump the tree into a staging directory, store and publish it, prune.

        :raises DumpFailed: CRIU or the store failed; no image changed.
        """
        t0 = time.monotonic()
        pending = images.new_pending(self.images_dir)
        batch = store.Batch(store.ChunkStore(self.images_dir))
        try:
            try:
                staging = self._criu_dump(leave_running, batch)
            except DumpFailed:
                images.discard(pending)
                raise
            t_criu = time.monotonic()
            manifest = Manifest(job_id=self.s.job_id, uid=self.s.uid, gid=self.s.gid, seq=0,
                                time=time.time(), pause_s=round(t_criu - t0, 3), reason=reason,
                                node=self.node, pipes=self.pipes)
            try:
                images.seal(staging, self.s.gid)
                path, stats = images.publish(staging, pending, manifest, key, batch)
            except OSError as exc:
                batch.close()
                images.discard(pending)
                images.collect_garbage(self.images_dir)   # frees the space of a full disk
                raise DumpFailed(f"publishing the image failed: {exc}") from None
            finally:
                images.discard(staging)
        finally:
            batch.close()
        t_store = time.monotonic()
        published = images.verify(path, key, job_id=self.s.job_id, uid=self.s.uid)
        if leave_running:
            images.prune(self.images_dir, path.name, self.s.keep)
        # at a preemption, retention waits for the next run's restore (off
        # the pause, and older images go only once the new one restored)
        t_end = time.monotonic()
        self.record("dump", image=path.name, reason=reason, bytes=published.bytes_written,
                    raw_bytes=published.raw_bytes, pause_s=published.pause_s,
                    store_s=round(t_store - t_criu, 3),
                    verify_prune_s=round(t_end - t_store, 3), total_s=round(t_end - t0, 3),
                    chunks=stats.chunks, new_chunks=stats.new_chunks,
                    files_stored_during_criu=stats.files_early, staging=str(staging.parent))
        log.info("%s %s dump %s: %.1f MB written of %.1f MB, criu %.2f s, store %.2f s, "
                 "verify+prune %.2f s", self.prefix, reason, path.name,
                 published.bytes_written / 1e6, published.raw_bytes / 1e6, t_criu - t0,
                 t_store - t_criu, t_end - t_store)
        return published

    def _criu_dump(self, leave_running: bool, batch: store.Batch) -> Path:
        """CRIU's dump into a staging directory (``images.staging_parent``:
        node-local memory when it has room for the tree's resident memory;
        on the disk again when it ran out there). Each rank's pages file is
        handed to ``batch`` as soon as CRIU closed it, so that it is stored
        while CRIU dumps the next rank.

        :raises DumpFailed: CRIU failed or timed out.
        """
        need = tree_resident_bytes(self.guardian_pid)   # node PIDs: the namespace's PID 1
        parents = [images.staging_parent(self.images_dir, need)]
        if parents[0] != self.images_dir:
            parents.append(self.images_dir)
        for n, parent in enumerate(parents):
            staging = images.new_staging_dir(parent, self.s.job_id, self.s.uid)
            fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            args = criu.in_namespaces(self.guardian_pid, criu.as_user(self.s.uid, self.s.gid,
                criu.dump_args(self.criu, self.pid, f"/proc/self/fd/{fd}",
                               leave_running=leave_running)))
            try:
                watcher: store.CloseWatcher | None = store.CloseWatcher(staging, "pages-",
                                                                        batch.add)
            except OSError as exc:            # no inotify left: stored after CRIU instead
                log.warning("%s %s", self.prefix, exc)
                watcher = None
            try:
                done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True,
                                      text=True, timeout=DUMP_TIMEOUT_S, pass_fds=(fd,))
            except subprocess.TimeoutExpired:
                images.discard(staging)
                raise DumpFailed(f"criu dump took more than {DUMP_TIMEOUT_S:g} s") from None
            finally:
                if watcher is not None:
                    watcher.stop()
                os.close(fd)
            if done.returncode == 0:
                return staging
            batch.close()
            batch.reset()
            tail = criu.log_tail(staging / "dump.log")
            images.discard(staging)                # frees the space of a full disk
            if n + 1 < len(parents) and "No space left" in tail:
                log.warning("%s %s is full; dumping to the disk", self.prefix, parent)
                continue
            raise DumpFailed(f"criu dump exited {done.returncode}: {tail or done.stderr}")
        raise DumpFailed("no staging directory")    # not reached

    def finish(self) -> None:
        """After the command ended by itself: its images are of no more use."""
        images.prune(self.images_dir, "", 0)


def tree_resident_bytes(pid: int) -> int:
    """Resident memory of the tree rooted at ``pid`` (shared pages counted
    in every process: an upper bound of what CRIU writes)."""
    total = 0
    for p in (pid, *tree.descendants(pid)):
        try:
            with open(f"/proc/{p}/statm", "rb") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    return total


class _Lines:
    """Lines of the guardian's status pipe, with a timeout."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buf, self.eof = fd, b"", False

    def next(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf and not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                data = os.read(self.fd, 4096)
                self.eof = not data
                self.buf += data
        if b"\n" not in self.buf:
            return None
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


def _read_env(fd: int) -> dict[str, str]:
    with os.fdopen(fd, "rb") as f:
        raw = f.read()
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.decode(errors="surrogateescape").partition("=")
        if sep and key:
            env[key] = value
    return env


def _forwarded(fd: int, keeper: Keeper) -> None:
    """Signals the batch task forwards (one byte each): Slurm's preemption
    signals the task alone. EOF (the task died) counts as SIGTERM."""
    while True:
        try:
            data = os.read(fd, 16)
        except OSError:
            data = b""
        if keeper.stop_signal is None:
            if not data:
                keeper.stop_signal = signal.SIGTERM
            elif any(b in _STOP_NUMBERS for b in data):
                keeper.stop_signal = next(b for b in data if b in _STOP_NUMBERS)
        if not data:
            return


_STOP_NUMBERS = {int(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
                                  signal.SIGUSR2, signal.SIGHUP, signal.SIGQUIT)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="singularity-transparent-keeper")
    parser.add_argument("--job-id", type=int, required=True)
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--gid", type=int, required=True)
    parser.add_argument("--env-fd", type=int, required=True)
    parser.add_argument("--signal-fd", type=int, default=-1,
                        help="socket on which the batch task forwards Slurm's signals")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    logging.basicConfig(level=logging.INFO, format="singularity: %(message)s",
                        stream=sys.stderr)
    env = _read_env(args.env_fd)
    prefix = f"[job {args.job_id}] transparent:"
    try:
        if not command:
            raise SetupError("no command to run")
        every = contract.ckpt_every_s(env)
        settings = Settings(job_id=args.job_id, uid=args.uid, gid=args.gid,
                            ckpt_dir=Path(os.path.abspath(default_ckpt_dir(env) or "/nonexistent")),
                            ckpt_every_s=every)
        keeper = Keeper(settings, command, env, os.getcwd())
    except (TransparentError, contract.ContractError, ValueError) as exc:
        log.error("%s refused: %s", prefix, exc)
        return SETUP_FAILED_EXIT

    def on_signal(signum: int, _frame: object) -> None:
        if keeper.stop_signal is None:
            keeper.stop_signal = signum
    stop = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2,
            contract.preempt_signal(env)}
    for sig in stop:
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGCONT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop)
    if args.signal_fd >= 0:
        threading.Thread(target=_forwarded, args=(args.signal_fd, keeper), daemon=True).start()
    try:
        code = keeper.run()
    except SetupError as exc:
        log.error("%s refused: %s", prefix, exc)
        return SETUP_FAILED_EXIT
    except (TransparentError, OSError) as exc:
        log.error("%s failed: %s", prefix, exc)
        return SETUP_FAILED_EXIT
    if code != contract.REQUEUE_EXIT_CODE or keeper.stop_signal is None:
        keeper.finish()
    return code


if __name__ == "__main__":
    sys.exit(main())
