"""The worker <-> proxy channel: two byte-stream rings in shared memory plus
a Unix socket used for the handshake and as a doorbell.

Why this shape: a worker issues thousands of small device operations per
step, and a syscall per operation would cost more than many of the
operations. Each direction is a single-producer single-consumer ring in a
``/dev/shm`` file (created 0600 with O_EXCL, handed to the worker as a file
descriptor over the socket with SCM_RIGHTS and unlinked at once, so no other
process can open it). Writers and readers only touch the mapped memory while
the other side is busy; a side that finds nothing to do spins briefly, then
sets a "waiting" flag in the ring header and sleeps on the socket, and the
other side rings the doorbell (one byte) only when it sees that flag. The
socket also tells each side when the other process has gone: a worker killed
with SIGKILL closes it, and the proxy stops reading that worker.

Frames are ``u32 length | payload``. A frame longer than the receiver's limit
is skipped and reported as :class:`WireError`, so the stream stays in step.
"""

from __future__ import annotations

import mmap
import os
import secrets
import select
import socket
import struct
import time
from pathlib import Path
from typing import Callable

from slurm_singularity.proxy.api import ChannelClosed, ProxyRefused, WireError

_HEADER = 64
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_WPOS, _RPOS, _RWAIT, _WWAIT = 0, 8, 16, 20
#: Seconds a side busy-polls its ring before it sleeps on the doorbell: a
#: peer that answers or sends again within it wakes nobody (a wake-up of a
#: sleeping process costs 100-200 us on a VM).
SPIN_S = 0.0005
#: Longest sleep between re-checks of a ring (bounds a lost wake-up).
NAP_S = 0.002
#: Longest sleep of an idle side (the doorbell wakes it sooner).
MAX_NAP_S = 0.05
#: Most bytes a reader takes from its ring at once: the frames in them are
#: then cut from a local buffer, not read from the ring one by one.
READ_AHEAD = 1 << 16
#: Most frames :meth:`Channel.drain` runs at once (the proxy holds the device
#: lock meanwhile; other workers of the device wait that long at most).
DRAIN_FRAMES = 256
HELLO_MAGIC = b"SGPX1"


class ShmRing:
    """A single-producer single-consumer byte ring over a shared mapping."""

    def __init__(self, mm: mmap.mmap) -> None:
        self.mm = mm
        self.capacity = len(mm) - _HEADER
        self.mask = self.capacity - 1

    def _get(self, off: int) -> int:
        return _U64.unpack_from(self.mm, off)[0]

    def readable(self) -> int:
        return self._get(_WPOS) - self._get(_RPOS)

    def writable(self) -> int:
        return self.capacity - (self._get(_WPOS) - self._get(_RPOS))

    def set_flag(self, off: int, value: int) -> None:
        _U32.pack_into(self.mm, off, value)

    def flag(self, off: int) -> bool:
        return _U32.unpack_from(self.mm, off)[0] != 0

    def write_some(self, data: memoryview) -> int:
        w = self._get(_WPOS)
        free = self.capacity - (w - self._get(_RPOS))
        n = min(free, len(data))
        if n <= 0:
            return 0
        start = w & self.mask
        first = min(n, self.capacity - start)
        self.mm[_HEADER + start:_HEADER + start + first] = data[:first]
        if n > first:
            self.mm[_HEADER:_HEADER + n - first] = data[first:n]
        _U64.pack_into(self.mm, _WPOS, w + n)
        return n

    def read_some(self, out: bytearray, want: int) -> int:
        r = self._get(_RPOS)
        n = min(self._get(_WPOS) - r, want)
        if n <= 0:
            return 0
        start = r & self.mask
        first = min(n, self.capacity - start)
        out += self.mm[_HEADER + start:_HEADER + start + first]
        if n > first:
            out += self.mm[_HEADER:_HEADER + n - first]
        _U64.pack_into(self.mm, _RPOS, r + n)
        return n


class Channel:
    """One end of a worker <-> proxy connection: ``tx`` is written by this
    end, ``rx`` read by it; ``sock`` is the doorbell and liveness signal."""

    def __init__(self, tx: ShmRing, rx: ShmRing, sock: socket.socket) -> None:
        self.tx, self.rx, self.sock = tx, rx, sock
        self.closed = False
        self._out = bytearray()
        self.queued = 0
        self._in = bytearray()
        self._in_pos = 0

    def _ring_bell(self) -> None:
        try:
            self.sock.send(b"!", socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass  # the peer has unread doorbells already
        except OSError as err:
            raise ChannelClosed(f"peer gone: {err}") from None

    def _sleep(self, ring: ShmRing, flag_off: int, ready) -> None:
        until = time.perf_counter() + SPIN_S
        while time.perf_counter() < until:
            for _ in range(16):
                if ready():
                    return
            os.sched_yield()  # lets the process's other threads (connections) have the GIL
        ring.set_flag(flag_off, 1)
        nap = NAP_S
        try:
            while not ready():
                r, _, _ = select.select([self.sock], [], [], nap)
                nap = min(nap * 2, MAX_NAP_S)
                if r:
                    try:
                        data = self.sock.recv(4096, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        continue
                    except OSError as err:
                        raise ChannelClosed(f"peer gone: {err}") from None
                    if not data and not ready():
                        self.closed = True
                        raise ChannelClosed("peer closed the channel")
        finally:
            ring.set_flag(flag_off, 0)

    def _write(self, data: memoryview) -> None:
        while data:
            n = self.tx.write_some(data)
            if n:
                data = data[n:]
                if self.tx.flag(_RWAIT):
                    self._ring_bell()
            else:
                if self.tx.flag(_RWAIT):
                    self._ring_bell()
                self._sleep(self.tx, _WWAIT, lambda: self.tx.writable() > 0)

    def _read_into(self, buf: bytearray, want: int, ahead: int = READ_AHEAD) -> None:
        """Append at least ``want`` bytes from the ring to ``buf``; up to
        ``ahead`` in all if they are there already."""
        while want > 0:
            n = self.rx.read_some(buf, max(want, ahead))
            if n:
                want -= n
                if self.rx.flag(_WWAIT):
                    self._ring_bell()
            else:
                self._sleep(self.rx, _RWAIT, lambda: self.rx.readable() > 0)

    def _take(self, n: int) -> bytearray:
        """The next ``n`` bytes of the stream (the read-ahead buffer first)."""
        have = len(self._in) - self._in_pos
        if have < n:
            if n - have > READ_AHEAD:  # a large frame: read it straight through
                out = self._in[self._in_pos:]
                self._in.clear()
                self._in_pos = 0
                self._read_into(out, n - len(out), ahead=0)
                return out
            if self._in_pos:
                del self._in[:self._in_pos]
                self._in_pos = 0
            self._read_into(self._in, n - have)
        out = self._in[self._in_pos:self._in_pos + n]
        self._in_pos += n
        if self._in_pos == len(self._in):
            self._in.clear()
            self._in_pos = 0
        return out

    def queue(self, payload: bytes) -> None:
        """Add one frame to the outgoing buffer; it reaches the ring at the
        next :meth:`flush` (one doorbell for many messages)."""
        if len(payload) >= 1 << 32:
            raise WireError(f"message of {len(payload)} bytes is larger than 4 GiB")
        if len(payload) >= 1 << 16:
            self.flush()
            self._write(memoryview(_U32.pack(len(payload))))
            self._write(memoryview(payload))
            return
        self._out += _U32.pack(len(payload))
        self._out += payload
        self.queued += 1

    def queue_frame(self, frame: bytes) -> None:
        """Add one message that carries its length prefix already (under
        64 KiB: the caller checks)."""
        self._out += frame
        self.queued += 1

    def flush(self) -> None:
        """Write the buffered frames; blocks while the ring is full.

        :raises ChannelClosed: the peer went away.
        """
        if self._out:
            out, self._out = self._out, bytearray()
            self.queued = 0
            self._write(memoryview(out))

    def send(self, payload: bytes) -> None:
        """Write one frame now (after any queued ones).

        :raises ChannelClosed: the peer went away.
        """
        self.queue(payload)
        self.flush()

    def send_raw(self, data: bytes) -> None:
        """Write bytes without framing (tests use it to send broken frames)."""
        self._write(memoryview(data))

    def recv(self, max_bytes: int) -> bytearray:
        """Read one frame.

        :raises WireError: the frame is longer than ``max_bytes`` (skipped).
        :raises ChannelClosed: the peer went away.
        """
        if len(self._in) - self._in_pos >= 4:  # the usual case: no copy of the length
            (length,) = _U32.unpack_from(self._in, self._in_pos)
            self._in_pos += 4
        else:
            (length,) = _U32.unpack(self._take(4))
        if length > max_bytes:
            left = length
            while left:
                step = min(left, 1 << 20)
                self._take(step)
                left -= step
            raise WireError(f"message of {length} bytes is larger than the limit "
                            f"of {max_bytes} bytes")
        return self._take(length)

    def drain(self, kind: int, handler: Callable[[bytearray, int, int], None],
              max_bytes: int, most: int = DRAIN_FRAMES) -> None:
        """Hand the frames of ``kind`` at the head of the read-ahead buffer,
        up to ``most``, to ``handler(buf, offset, length)`` (their payloads,
        not copied); stop at another kind, a frame not yet whole, or one over
        ``max_bytes`` (``recv`` deals with those). A frame is consumed before
        its handler runs, so an exception leaves the stream in step.
        """
        buf = self._in
        pos, end = self._in_pos, len(buf)
        try:
            while most > 0 and end - pos > 4:
                (length,) = _U32.unpack_from(buf, pos)
                if length > end - pos - 4 or length > max_bytes or buf[pos + 4] != kind:
                    break
                pos += 4 + length
                self._in_pos = pos
                most -= 1
                handler(buf, pos - length, length)
        finally:
            if self._in_pos == end:
                buf.clear()
                self._in_pos = 0

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        finally:
            for ring in (self.tx, self.rx):
                try:
                    ring.mm.close()
                except BufferError:
                    pass


def _new_shm(size: int) -> tuple[int, Path]:
    for _ in range(8):
        path = Path("/dev/shm") / f"singularity-proxy-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            continue
        os.ftruncate(fd, size)
        return fd, path
    raise OSError("could not create a shared-memory file in /dev/shm")


def serve_handshake(conn: socket.socket, ring_bytes: int) -> Channel:
    """Proxy side, after the peer check: create the two rings, pass their
    descriptors to the worker, unlink them. Returns the proxy's end."""
    size = _HEADER + ring_bytes
    fds, paths = [], []
    try:
        for _ in range(2):
            fd, path = _new_shm(size)
            fds.append(fd)
            paths.append(path)
        hello = HELLO_MAGIC + _U64.pack(ring_bytes)
        socket.send_fds(conn, [hello], fds)
        req = ShmRing(mmap.mmap(fds[0], size))
        rep = ShmRing(mmap.mmap(fds[1], size))
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
        for fd in fds:
            os.close(fd)
    return Channel(tx=rep, rx=req, sock=conn)


def connect(addr: str | os.PathLike, timeout: float = 30.0) -> Channel:
    """Worker side: connect to a proxy's socket and map its rings.

    :raises ProxyRefused: the proxy refused this process (wrong user).
    :raises OSError: no proxy listens there, or the path is not reachable.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fspath(addr))
        msg, fds, _flags, _addr = socket.recv_fds(sock, 256, 2)
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    if not msg.startswith(HELLO_MAGIC) or len(fds) != 2:
        for fd in fds:
            os.close(fd)
        sock.close()
        text = msg.decode(errors="replace").strip() or "connection closed"
        raise ProxyRefused(f"proxy at {addr} refused the connection: {text}")
    (ring_bytes,) = _U64.unpack(msg[len(HELLO_MAGIC):len(HELLO_MAGIC) + 8])
    size = _HEADER + ring_bytes
    try:
        req = ShmRing(mmap.mmap(fds[0], size))
        rep = ShmRing(mmap.mmap(fds[1], size))
    finally:
        for fd in fds:
            os.close(fd)
    return Channel(tx=req, rx=rep, sock=sock)
