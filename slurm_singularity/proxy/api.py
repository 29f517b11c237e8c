"""The device proxy's contract: settings, the handle a launcher holds, the
lifecycle, the exception tree, and ``start_proxies``/``stop_proxies``.

A device proxy is one process per physical device that owns it (on a GPU
host, the only process with a CUDA context for it). Workers attach over a
Unix socket (handshake, peer-credential check) and then talk over a pair of
shared-memory rings; their tensors live in the proxy, so a worker can crash
and re-attach without losing device state. This module is what a launcher,
the runtime's glue and the CLI import; the server and client sit beside it.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class ProxyError(RuntimeError):
    """Base of everything the proxy or its client raises."""


class WireError(ProxyError, ValueError):
    """A message is malformed, truncated, oversized or names something that
    does not exist; the text says which field and where."""


class ChannelClosed(ProxyError):
    """The other end of a channel went away (process exited or was killed)."""


class ProxyRefused(ProxyError):
    """The proxy refused the connection (wrong user, bad handshake)."""


class RemoteError(ProxyError):
    """An operation failed inside the proxy; carries the proxy's message."""


class ProxySpecError(ProxyError, ValueError):
    """A proxy setting is invalid; names the setting."""


class ProxyState(enum.Enum):
    """Lifecycle of a proxy daemon.

    STARTING -> SERVING -> STOPPING -> STOPPED; STARTING -> STOPPED when the
    device or socket cannot be set up. STOPPED is terminal.
    """

    STARTING = "starting"
    SERVING = "serving"
    STOPPING = "stopping"
    STOPPED = "stopped"


#: Bounds of ProxySettings: a ring lives in /dev/shm (memory), so it is at
#: most 1 GiB; a message at most 64 GiB (the largest tensor a worker may
#: send in one piece); intra-op threads at most 1024.
MIN_RING_BYTES = 4096
MAX_RING_BYTES = 1 << 30
MAX_MESSAGE_BYTES = 1 << 36
MAX_THREADS = 1024


@dataclass(frozen=True)
class ProxySettings:
    """How one proxy daemon runs."""

    #: ``"cpu"`` (emulated device backed by the CPU) or a CUDA index ``"0"``.
    device: str
    #: Path of the handshake socket; its directory is created 0700.
    socket_path: Path
    #: Pid file path; default: ``<socket_path>.pid``.
    pid_file: Path | None = None
    #: Bytes of each shared-memory ring (request and reply), power of two.
    ring_bytes: int = 1 << 22
    #: Largest message a worker may send, bytes; bigger ones are refused.
    max_message_bytes: int = 1 << 30
    #: Torch intra-op threads in the proxy (CPU device); 0 = torch default.
    threads: int = 1
    #: uid allowed to attach; default: the proxy's own uid.
    allowed_uid: int | None = None
    #: CPUs the proxy runs on (``sched_setaffinity``), e.g. ``(3,)``; default:
    #: those it inherits. A proxy on a core of its own is not moved onto its
    #: workers' core by the scheduler (see docs/proxy.md).
    cpus: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.device != "cpu" and not (self.device.isdigit()):
            raise ProxySpecError(f"device={self.device!r}: expected 'cpu' or a GPU index")
        if (not MIN_RING_BYTES <= self.ring_bytes <= MAX_RING_BYTES
                or self.ring_bytes & (self.ring_bytes - 1)):
            raise ProxySpecError(f"ring_bytes={self.ring_bytes}: a power of two in "
                                 f"[{MIN_RING_BYTES}, {MAX_RING_BYTES}]")
        if not 64 <= self.max_message_bytes <= MAX_MESSAGE_BYTES:
            raise ProxySpecError(f"max_message_bytes={self.max_message_bytes}: must be in "
                                 f"[64, {MAX_MESSAGE_BYTES}]")
        if not 0 <= self.threads <= MAX_THREADS:
            raise ProxySpecError(f"threads={self.threads}: must be in [0, {MAX_THREADS}]")
        if self.cpus is not None and (
                not self.cpus or not all(type(c) is int and c >= 0 for c in self.cpus)):
            raise ProxySpecError(f"cpus={self.cpus!r}: a non-empty list of CPU numbers >= 0")
        if len(os.fsencode(self.socket_path)) >= 108:
            raise ProxySpecError(f"socket_path={self.socket_path}: longer than a Unix "
                                 "socket path may be (107 bytes)")

    @property
    def pid_path(self) -> Path:
        return self.pid_file or Path(str(self.socket_path) + ".pid")


@dataclass(frozen=True)
class ProxyHandle:
    """What a launcher keeps for a proxy it started: enough to attach and to
    stop it by pid."""

    device: str
    socket_path: Path
    pid: int
    pid_file: Path
    log_file: Path | None = field(default=None, compare=False)

    @property
    def addr(self) -> str:
        return str(self.socket_path)


def _proxy_argv(settings: ProxySettings, log_level: str) -> list[str]:
    return [sys.executable, "-m", "slurm_singularity.cli.proxy", "--device", settings.device,
            "--socket", str(settings.socket_path), "--pid-file", str(settings.pid_path),
            "--threads", str(settings.threads), "--log-level", log_level,
            "--ring-bytes", str(settings.ring_bytes),
            "--max-message-bytes", str(settings.max_message_bytes),
            *(["--cpus", ",".join(map(str, settings.cpus))] if settings.cpus else [])]


def start_proxy(settings: ProxySettings, log_file: Path | None = None,
                log_level: str = "INFO", timeout: float = 60.0) -> ProxyHandle:
    """Start one ``singularity-proxy`` process and wait until it serves.

    :raises ProxyError: it exited or did not create its socket in ``timeout``.
    """
    return _wait_ready(_spawn(settings, log_file, log_level), time.monotonic() + timeout)


@dataclass(frozen=True)
class _Spawned:
    """A proxy process started and not yet known to serve."""

    proc: subprocess.Popen
    settings: ProxySettings
    log_file: Path | None


def _spawn(settings: ProxySettings, log_file: Path | None, log_level: str) -> _Spawned:
    settings.socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(_proxy_argv(settings, log_level), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    finally:
        if log_file:
            out.close()
    return _Spawned(proc, settings, log_file)


def _wait_ready(spawned: _Spawned, deadline: float) -> ProxyHandle:
    settings, proc, log_file = spawned.settings, spawned.proc, spawned.log_file
    while not settings.pid_path.exists() or not settings.socket_path.exists():
        if proc.poll() is not None:
            raise ProxyError(f"singularity-proxy --device {settings.device} exited with "
                             f"{proc.returncode}{_log_tail(log_file)}")
        if time.monotonic() > deadline:
            proc.kill()
            raise ProxyError(f"singularity-proxy --device {settings.device} did not start "
                             f"in time{_log_tail(log_file)}")
        time.sleep(0.05)
    return ProxyHandle(settings.device, settings.socket_path, proc.pid, settings.pid_path,
                       log_file)


def _log_tail(log_file: Path | None) -> str:
    """'; see LOG: its last line' for an error message."""
    if log_file is None:
        return ""
    try:
        lines = log_file.read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    return f"; see {log_file}" + (f": {lines[-1]}" if lines else "")


def start_proxies(n: int, state_dir: str | os.PathLike, device: str | None = None,
                  timeout: float = 60.0, **settings: object) -> list[ProxyHandle]:
    """Start ``n`` proxies, one per device, with sockets, pid files and logs
    under ``state_dir/proxy`` (created 0700); all start at once, then this
    waits until each serves. Devices are the CUDA indices 0..n-1 when
    pynvml sees at least ``n`` GPUs, else emulated CPU devices
    (``device="cpu"`` forces that).

    :raises ProxySpecError: ``n`` < 1 or a bad setting.
    :raises ProxyError: a proxy did not start (the others are stopped).
    """
    if n < 1:
        raise ProxySpecError(f"n={n}: need at least one proxy")
    from slurm_singularity.proxy.devices import gpu_count

    base = Path(state_dir) / "proxy"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(base, 0o700)
    use_gpu = device != "cpu" and gpu_count() >= n
    specs = [ProxySettings(device=str(i) if use_gpu else "cpu",
                           socket_path=base / f"dev{i}.sock", **settings) for i in range(n)]
    spawned: list[_Spawned] = []
    handles: list[ProxyHandle] = []
    deadline = time.monotonic() + timeout
    try:
        for i, spec in enumerate(specs):
            spawned.append(_spawn(spec, base / f"dev{i}.log", "INFO"))
        for one in spawned:
            handles.append(_wait_ready(one, deadline))
    except Exception:
        for one in spawned:
            if one.proc.poll() is None:
                one.proc.kill()
            one.proc.wait()
        raise
    log.info("[node] started %s device proxies under %s", n, base)
    return handles


def stop_proxies(handles: list[ProxyHandle], timeout: float = 10.0) -> None:
    """SIGTERM each proxy by pid, wait, then SIGKILL the ones still running."""
    for h in handles:
        try:
            os.kill(h.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for h in handles:
        while _alive(h.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(h.pid):
            log.warning("[node] proxy pid %s ignored SIGTERM; killing it", h.pid)
            try:
                os.kill(h.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (reaps it if it is our exited child)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
