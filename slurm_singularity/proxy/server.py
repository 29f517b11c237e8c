"""The device proxy daemon: owns one device, accepts workers of the job's own
user on a Unix socket, and serves each over its shared-memory channel.

One thread per worker connection reads that worker's messages in order and
executes them under the device lock, so a worker's device work runs in
submission order and several workers (spliced ranks) share the device and
the named tensors of their job. A worker that dies (even with SIGKILL) only
closes its own connection: the job's named tensors stay, and a worker that
attaches under the same job name later finds them. Before a re-attach sees
the job, the proxy finishes whatever complete messages the dead worker left
in its ring, so the state it sees is final.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from pathlib import Path

import torch

from slurm_singularity.proxy.api import (
    ChannelClosed, ProxySettings, ProxySpecError, ProxyState, WireError, _alive,
)
from slurm_singularity.proxy.executor import Device, Session
from slurm_singularity.proxy.ring import Channel, serve_handshake
from slurm_singularity.proxy.wire import REPLY_KINDS, MsgKind, decode_frame, encode_message

_RUN_KIND = int(MsgKind.RUN)
log = logging.getLogger(__name__)
_CRED = struct.Struct("3i")


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end (SO_PEERCRED)."""
    return _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))


class _Conn:
    def __init__(self, server: "ProxyServer", channel: Channel, pid: int) -> None:
        self.server = server
        self.channel = channel
        self.pid = pid
        self.session = Session(server.device, f"pid {pid}")
        self.session.on_attach = self._on_attach
        self.thread = threading.Thread(target=self.run, name=f"proxy-conn-{pid}", daemon=True)

    def _on_attach(self, job: str) -> bool:
        return self.server.settle_job(job, self)

    def _reply(self, kind: MsgKind, rid: int, value: object) -> None:
        self.channel.send(encode_message(kind, rid, value))

    def run(self) -> None:
        # no autograd in the proxy (the worker does it): inference mode skips
        # the autograd and version-counter work of every operator
        with torch.inference_mode():
            self._serve()

    def _serve(self) -> None:
        srv = self.server
        limit = srv.settings.max_message_bytes
        try:
            while not srv.stopping.is_set():
                rid, kind = 0, 0
                try:
                    payload = self.channel.recv(limit)
                    if payload and payload[0] == _RUN_KIND:  # most messages: no reply, no decoding
                        with srv.device.lock:
                            self.session.run_at(payload, 0, len(payload))
                            # and the RUNs right behind it, without a trip round this loop
                            self.channel.drain(_RUN_KIND, self.session.run_at, limit)
                        continue
                    kind, rid, body = decode_frame(payload, limit)
                    wants_reply = kind in REPLY_KINDS
                    earlier = None
                    with srv.device.lock:  # replies are sent outside the lock
                        if wants_reply and self.session.deferred:
                            earlier, self.session.deferred = self.session.deferred, None
                        else:
                            value = self.session.handle(kind, body)
                    if earlier is not None:
                        self._reply(MsgKind.ERROR, rid, f"an earlier operation failed: {earlier}")
                    elif wants_reply:
                        self._reply(MsgKind.OK, rid, value)
                except WireError as err:
                    log.warning("[node] bad message from %s: %s", self.session.peer, err)
                    self._reply(MsgKind.ERROR, rid, f"bad message: {err}")
                except ChannelClosed:
                    raise
                except Exception as err:  # an operator failed
                    text = f"{type(err).__name__}: {err}"
                    if rid and kind in REPLY_KINDS:
                        self._reply(MsgKind.ERROR, rid, text)
                    elif self.session.deferred is None:
                        self.session.deferred = text
                    log.debug("[node] op failed for %s: %s", self.session.peer, text)
        except ChannelClosed:
            log.info("[node] worker %s (job %s) left", self.session.peer,
                     self.session.job.name if self.session.job else "-")
        except Exception:
            log.exception("[node] connection of %s failed", self.session.peer)
        finally:
            with srv.device.lock:
                self.session.table.clear()
            self.channel.close()
            srv.forget(self)


class ProxyServer:
    """One device, one socket, many worker connections."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.state = ProxyState.STARTING
        self.stopping = threading.Event()
        self.allowed_uid = settings.allowed_uid if settings.allowed_uid is not None else os.getuid()
        if settings.cpus is not None:
            try:
                os.sched_setaffinity(0, settings.cpus)
            except OSError as err:
                raise ProxySpecError(
                    f"cpus={','.join(map(str, settings.cpus))}: this process may not run "
                    f"there (it may use {sorted(os.sched_getaffinity(0))}): {err}") from None
        if settings.threads:
            torch.set_num_threads(settings.threads)
        dev = torch.device("cpu") if settings.device == "cpu" else torch.device(
            "cuda", int(settings.device))
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        self.device = Device(dev, settings.max_message_bytes)
        self.conns: list[_Conn] = []
        self._conns_lock = threading.Lock()
        self.sock: socket.socket | None = None

    # -- connections ---------------------------------------------------------
    def settle_job(self, job: str, me: _Conn) -> bool:
        """Wait until connections of ``job`` whose worker died have drained;
        True when ``me`` is then the job's only connection."""
        deadline = time.monotonic() + 30.0
        while True:
            with self._conns_lock:
                others = [c for c in self.conns if c is not me and c.session.job is not None
                          and c.session.job.name == job]
            dead = [c for c in others if not _alive(c.pid)]
            if not dead or time.monotonic() > deadline:
                return not others
            # the dead worker's thread needs the device lock to finish
            self.device.lock.release()
            try:
                for c in dead:
                    c.thread.join(timeout=0.1)
            finally:
                self.device.lock.acquire()

    def forget(self, conn: _Conn) -> None:
        with self._conns_lock:
            if conn in self.conns:
                self.conns.remove(conn)

    def _accept(self, conn: socket.socket) -> None:
        pid, uid, _gid = peer_credentials(conn)
        if uid != self.allowed_uid:
            log.warning("[node] refused a connection from uid %s (pid %s): only uid %s "
                        "may use this proxy", uid, pid, self.allowed_uid)
            try:
                conn.sendall(b"REFUSED: uid %d may not use this proxy\n" % uid)
            except OSError:
                pass
            conn.close()
            return
        channel = serve_handshake(conn, self.settings.ring_bytes)
        c = _Conn(self, channel, pid)
        with self._conns_lock:
            self.conns.append(c)
        log.info("[node] worker pid %s attached", pid)
        c.thread.start()

    # -- lifecycle ---------------------------------------------------------------
    def bind(self) -> None:
        """Create the socket (0600, in a 0700 directory) and the pid file."""
        path = self.settings.socket_path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        if path.exists() or path.is_symlink():
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(64)
        sock.settimeout(0.2)
        self.sock = sock
        pid_path = self.settings.pid_path
        tmp = Path(str(pid_path) + ".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, pid_path)
        self.state = ProxyState.SERVING
        log.info("[node] proxy for device %s serving on %s (pid %s)", self.device.device,
                 path, os.getpid())

    def serve_forever(self) -> None:
        if self.sock is None:
            self.bind()
        listener = self.sock
        while not self.stopping.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self.stopping.is_set():
                    break
                raise
            try:
                conn.settimeout(None)
                self._accept(conn)
            except Exception:
                log.exception("[node] handshake failed")
                conn.close()
        self._shutdown()

    def stop(self, reason: str) -> None:
        """Ask the serve loop to end (safe from a signal handler)."""
        if not self.stopping.is_set():
            log.info("[node] proxy stopping: %s", reason)
            self.state = ProxyState.STOPPING
            self.stopping.set()

    def _shutdown(self) -> None:
        with self._conns_lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.channel.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for c in conns:
            c.thread.join(timeout=2.0)
        if self.sock is not None:
            self.sock.close()
        for p in (self.settings.socket_path, self.settings.pid_path):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        self.state = ProxyState.STOPPED
        log.info("[node] proxy stopped")
