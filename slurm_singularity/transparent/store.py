"""The chunk store: image files kept as compressed, deduplicated chunks.

Why: a dump is every rank's memory, and DDP ranks hold the same parameters
and optimizer state; successive dumps of a job repeat what did not change.
Stored as files, 4 ranks of 300 MB cost 1.2 GB per dump and the sha256 +
fsync of all of it was most of the pause (issue 15, item 4). So each image
file is cut into chunks, each chunk is stored once under its sha256 in
``transparent/chunks/`` (shared by all ranks and all dumps of the job),
compressed with zlib level 1 when that pays (random floats do not compress:
a 4 KiB probe decides, so they cost no compression time), and a dump's
manifest lists each file as its chunks' hashes and lengths. Only new chunks
are written and fsynced, by several threads (sha256 and zlib release the
GIL on big buffers). The files are mapped, not read (a fresh buffer's page
faults cost as much as hashing here), and a chunk equal to one already seen
in the dump (the next rank's copy of the parameters) is found by ``memcmp``
and never hashed: hashing is most of the pause, and memcmp is ~10x faster.

Why content-defined cuts on page boundaries: CRIU's ``pages-*.img`` holds a
process's pages back to back, so the same parameters sit at a different
offset in each rank's file; fixed-size chunks would not line up. A cut falls
before a page whose first byte is one of four values (one page in 64 of
random data, so ~320 KiB on average; at least 16 pages, at most 512), so
the same run of pages is cut the same way wherever it sits. The same bytes
at another offset *within* a page are not found: DDP ranks running the same
code allocate their tensors alike, so theirs line up.

Crash safety: a chunk is written to a temporary name, fsynced and renamed;
the manifest that names it is published only after the chunk directory was
fsynced (``images.publish``). ``collect`` removes only chunks no manifest on
disk names, and removes manifests first, so a kill at any point leaves every
kept image whole. Runs as root in the keeper; ``chunks/`` is root's, 0700.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import mmap
import os
import select
import stat
import struct
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from slurm_singularity.runtime.dirlock import fsync_dir
from slurm_singularity.transparent.api import ImageRefused

log = logging.getLogger(__name__)

#: Subdirectory of ``transparent/`` that holds the chunks.
CHUNKS_SUBDIR = "chunks"
PAGE = 4096
#: Fewest and most pages in a chunk (64 KiB .. 2 MiB).
MIN_PAGES, MAX_PAGES = 16, 512
#: A page starts a chunk when its first byte is one of these (1 in 64 of
#: random bytes; neither 0x00 nor 0xff, so runs of zero or filled pages are
#: not cut into small chunks).
_CUT_BYTES = b"\x3b\x77\x9d\xc5"
_CUT_TABLE = bytes(1 if i in _CUT_BYTES else 0 for i in range(256))
#: A chunk is compressed when zlib shrinks a probe of its start below this.
PAYS = 0.9
PROBE = 4096
#: Threads that hash, compress, write and fsync chunks (and verify at restore).
THREADS = 4
RAW, ZLIB = b"R", b"Z"


@dataclass(frozen=True)
class StoreStats:
    """What storing one dump cost."""

    #: Bytes of the image files (before dedup and compression).
    raw_bytes: int = 0
    #: Bytes written to the store (new chunks, compressed where it paid).
    written_bytes: int = 0
    #: Chunks written (new) and chunks referenced in all.
    new_chunks: int = 0
    chunks: int = 0
    #: Files stored while CRIU was still writing others (``CloseWatcher``).
    files_early: int = 0


def cut_points(buf: bytes | bytearray | memoryview | mmap.mmap) -> list[int]:
    """Offsets (page multiples) where ``buf`` is cut into chunks, ``len(buf)``
    excluded; the same pages give the same cuts wherever they start (pure).
    A chunk ends before the first page at least ``MIN_PAGES`` on whose first
    byte is one of ``_CUT_BYTES``, else after ``MAX_PAGES`` pages; the first
    bytes are gathered and searched in C (a loop over pages in Python costs
    0.2 s per GB)."""
    pages = len(buf) // PAGE
    if pages <= MIN_PAGES:
        return []
    flags = bytes(memoryview(buf)[:pages * PAGE:PAGE]).translate(_CUT_TABLE)
    cuts, last = [], 0
    while True:
        p = flags.find(b"\x01", last + MIN_PAGES, last + MAX_PAGES)
        if p < 0:
            p = last + MAX_PAGES
        if p >= pages:
            return cuts
        cuts.append(p * PAGE)
        last = p


class _Mapped:
    """An image file mapped whole (shared, populated: no copy, no fault per
    page), with its address for ``memcmp``. Root's file after ``seal``; a
    process of the user that kept a descriptor could still truncate it
    (the keeper then dies of SIGBUS and the job's previous image is used:
    the user harms only their own job)."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise OSError(f"{path.name} is not a plain file with one link")
            self.identity = _identity(st)
            self.size = st.st_size
            self.map = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE) if self.size else None
        finally:
            os.close(fd)
        self.view = memoryview(self.map) if self.map is not None else memoryview(b"")
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.map)) if self.map else 0

    def close(self) -> None:
        self.view.release()
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:          # a view still held: unmapped when collected
                pass


_libc = ctypes.CDLL(None, use_errno=True)
_libc.memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_libc.memcmp.restype = ctypes.c_int


def _same(a: tuple[_Mapped, int], b: tuple[_Mapped, int], n: int) -> bool:
    """Whether ``n`` bytes at two places of mapped files are equal (memcmp:
    10x faster than hashing them)."""
    return _libc.memcmp(a[0].base + a[1], b[0].base + b[1], n) == 0


def encode(raw: bytes | memoryview) -> tuple[bytes, bytes | memoryview]:
    """A chunk as stored, (kind, body): zlib level 1 when a probe shows it
    pays, else the bytes as they are."""
    if len(zlib.compress(raw[:PROBE], 1)) < PAYS * min(len(raw), PROBE):
        packed = zlib.compress(raw, 1)
        if len(packed) < len(raw):
            return ZLIB, packed
    return RAW, raw


def decode(stored: bytes, raw_len: int) -> bytes:
    """:raises ValueError: not a chunk of ``raw_len`` bytes."""
    kind, body = stored[:1], memoryview(stored)[1:]
    if kind == RAW:
        return bytes(body)
    if kind == ZLIB:
        d = zlib.decompressobj()
        out = d.decompress(body, raw_len + 1)
        if not d.eof:
            raise ValueError("compressed data is truncated or too long")
        return out
    raise ValueError("unknown chunk encoding")


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


class Batch:
    """One dump's files going into the store. ``add`` may run while CRIU
    still writes the next rank's files (``CloseWatcher`` calls it when CRIU
    closes one), so that most of the storing is done when CRIU ends;
    ``finish`` adds the rest, and starts over from nothing if a file added
    early changed since (CRIU writes each file once, so it never does).

    A chunk equal to one seen earlier in the batch (another rank's copy of
    the same parameters: same length and ends, then ``memcmp``) takes its
    hash without being hashed.
    """

    def __init__(self, chunks: "ChunkStore") -> None:
        self.store = chunks
        self.reset()

    def reset(self) -> None:
        """Start afresh (after ``close``): nothing added, new threads."""
        self.known = set(os.listdir(self.store.dir))
        self.written = [0, 0]
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(THREADS, thread_name_prefix="chunks")
        self.maps: list[_Mapped] = []
        self.seen: dict[tuple[int, bytes, bytes], tuple[_Mapped, int, Future]] = {}
        self.plans: dict[str, tuple[tuple[int, int, int], list[tuple[Future, bool]]]] = {}

    def _put(self, raw: memoryview) -> tuple[str, int, int]:
        digest = hashlib.sha256(raw).hexdigest()
        with self.lock:
            new = digest not in self.known
            self.known.add(digest)
        size = 0
        if new:
            kind, body = encode(raw)
            self.store._write(digest, kind, body)
            size = len(kind) + len(body)
            with self.lock:
                self.written[0] += size
                self.written[1] += 1
        return digest, len(raw), size

    def add(self, path: Path) -> None:
        """Map ``path``, cut it and hand its new chunks to the threads.

        :raises OSError: it cannot be mapped (not a plain file with one link).
        """
        mapped = _Mapped(path)
        self.maps.append(mapped)
        plan = []
        offsets = [0, *cut_points(mapped.view), mapped.size] if mapped.size else []
        for start, end in zip(offsets, offsets[1:]):
            view, n = mapped.view[start:end], end - start
            key = (n, bytes(view[:32]), bytes(view[-32:]))
            first = self.seen.get(key)
            if first is not None and _same((first[0], first[1]), (mapped, start), n):
                plan.append((first[2], True))
                continue
            future = self.pool.submit(self._put, view)
            self.seen.setdefault(key, (mapped, start, future))
            plan.append((future, False))
        self.plans[path.name] = (mapped.identity, plan)

    def finish(self, paths: list[Path]) -> tuple[list[tuple[list[tuple[str, int]], int]],
                                                 StoreStats]:
        """Every file stored; returns each file's chunks (sha256, length)
        with the bytes written for it, and the cost of all. Every new chunk
        is durable when this returns.

        :raises OSError: a read, write or fsync failed (chunks already
            written are unreferenced and go at the next ``collect``).
        """
        for path in paths:
            early = self.plans.get(path.name)
            if early is not None and early[0] != _identity(os.lstat(path)):
                log.warning("transparent: %s changed after it was stored; storing again", path)
                self.close()
                self.reset()
                break
        early = sum(1 for p in paths if p.name in self.plans)
        for path in paths:
            if path.name not in self.plans:
                self.add(path)
        done = [[(f.result(), dup) for f, dup in self.plans[p.name][1]] for p in paths]
        fsync_dir(self.store.dir)
        out = [([(h, n) for (h, n, _), _ in items],
                sum(w for (_, _, w), dup in items if not dup)) for items in done]
        return out, StoreStats(raw_bytes=sum(n for items in done for (_, n, _), _ in items),
                               written_bytes=self.written[0], new_chunks=self.written[1],
                               chunks=sum(map(len, done)), files_early=early)

    def close(self) -> None:
        """Wait for the threads and unmap the files."""
        self.pool.shutdown(wait=True)
        self.seen.clear()
        for mapped in self.maps:
            mapped.close()
        self.maps.clear()


class CloseWatcher:
    """Calls ``on_closed(path)`` for each file matching ``prefix`` that is
    closed after writing in ``directory`` (inotify), from a thread, until
    ``stop``; errors in ``on_closed`` are logged and the file is left for
    later."""

    IN_CLOSE_WRITE = 0x8

    def __init__(self, directory: Path, prefix: str, on_closed) -> None:
        self.dir, self.prefix, self.on_closed = directory, prefix, on_closed
        self.fd = _libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {directory}")
        if _libc.inotify_add_watch(self.fd, os.fsencode(directory), self.IN_CLOSE_WRITE) < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"inotify on {directory}")
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="close-watcher", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if not ready:
                continue
            data = os.read(self.fd, 65536)
            at = 0
            while at + 16 <= len(data):
                _, _, _, n = struct.unpack_from("iIII", data, at)
                name = data[at + 16:at + 16 + n].rstrip(b"\0").decode(errors="replace")
                at += 16 + n
                if name.startswith(self.prefix):
                    try:
                        self.on_closed(self.dir / name)
                    except (OSError, ValueError) as exc:
                        log.info("transparent: %s left for after the dump: %s", name, exc)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        os.close(self.fd)


class ChunkStore:
    """The chunks of one job (``transparent/chunks/``, root's, 0700)."""

    def __init__(self, images_dir: Path) -> None:
        self.dir = images_dir / CHUNKS_SUBDIR
        try:
            os.mkdir(self.dir, 0o700)
        except FileExistsError:
            pass
        self._lock = threading.Lock()

    def put_files(self, paths: list[Path]) -> tuple[list[tuple[list[tuple[str, int]], int]],
                                                    StoreStats]:
        """Store the files at once (see ``Batch``).

        :raises OSError: a read, write or fsync failed.
        """
        batch = Batch(self)
        try:
            return batch.finish(paths)
        finally:
            batch.close()

    def _write(self, digest: str, kind: bytes, body: bytes | memoryview) -> None:
        tmp = self.dir / f".tmp-{digest}-{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, kind)
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.dir / digest)

    def missing(self, chunks: list[tuple[str, int]]) -> str | None:
        """The first chunk not in the store, else None."""
        for digest, _ in chunks:
            if not os.path.isfile(self.dir / digest):
                return digest
        return None

    def assemble(self, files: list[tuple[str, list[tuple[str, int]], int]],
                 pool: ThreadPoolExecutor) -> None:
        """Write each file (name, chunks, descriptor opened for writing) from
        its chunks; each distinct chunk is read and verified once and written
        wherever it occurs (every rank's copy of the parameters).

        :raises ImageRefused: a chunk is missing, unreadable or altered
            (names a file that holds it and the chunk).
        """
        places: dict[str, list[tuple[str, int, int]]] = {}
        sizes: dict[str, int] = {}
        for name, chunks, fd in files:
            at = 0
            for digest, n in chunks:
                places.setdefault(digest, []).append((name, fd, at))
                sizes[digest] = n
                at += n
            os.ftruncate(fd, at)

        def one(digest: str) -> None:
            n, name = sizes[digest], places[digest][0][0]
            try:
                with open(self.dir / digest, "rb", buffering=0) as f:
                    raw = decode(f.read(), n)
            except FileNotFoundError:
                raise ImageRefused(f"{name}: chunk {digest[:16]} is missing from the "
                                   f"store") from None
            except (OSError, ValueError, zlib.error) as exc:
                raise ImageRefused(f"{name}: chunk {digest[:16]} was changed after the dump "
                                   f"({exc})") from None
            if len(raw) != n or hashlib.sha256(raw).hexdigest() != digest:
                raise ImageRefused(f"{name}: chunk {digest[:16]} was changed after the dump "
                                   f"(size or sha256)")
            for _, fd, offset in places[digest]:
                view = memoryview(raw)
                while view:
                    done = os.pwrite(fd, view, offset)
                    view, offset = view[done:], offset + done

        for _ in pool.map(one, list(places)):
            pass

    def collect(self, referenced: set[str]) -> int:
        """Remove chunks (and interrupted writes) no kept manifest names;
        returns how many."""
        removed = 0
        for name in os.listdir(self.dir):
            if name not in referenced:
                try:
                    os.unlink(self.dir / name)
                    removed += 1
                except FileNotFoundError:
                    pass
        return removed
