"""The chunk store: image files kept as compressed, deduplicated chunks.

Why: a dump is every rank's memory, and DDP ranks hold the same parameters
and optimizer state; successive dumps of a job repeat what did not change.
Stored as files, 4 ranks of 300 MB cost 1.2 GB per dump and the sha256 +
fsync of all of it was most of the pause (issue 15, item 4). So each image
file is cut into chunks, each chunk is stored once under its sha256 in
``transparent/chunks/`` (shared by all ranks and all dumps of the job),
compressed with zlib level 1 when that pays (random floats do not compress:
a 16 KiB probe decides, so they cost no compression time), and a dump's
manifest lists each file as its chunks' hashes and lengths. Only new chunks
are written and fsynced, by several threads (sha256 and zlib release the
GIL on big buffers).

Why content-defined cuts on page boundaries: CRIU's ``pages-*.img`` holds a
process's pages back to back, so the same parameters sit at a different
offset in each rank's file; fixed-size chunks would not line up. A cut falls
before a page whose first 8 bytes hash below a threshold (one page in 64,
so ~256 KiB on average; at least 16 pages, at most 512), so the same run of
pages is cut the same way wherever it sits.

Crash safety: a chunk is written to a temporary name, fsynced and renamed;
the manifest that names it is published only after the chunk directory was
fsynced (``images.publish``). ``collect`` removes only chunks no manifest on
disk names, and removes manifests first, so a kill at any point leaves every
kept image whole. Runs as root in the keeper; ``chunks/`` is root's, 0700.
"""

from __future__ import annotations

import hashlib
import os
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from slurm_singularity.runtime.dirlock import fsync_dir
from slurm_singularity.transparent.api import ImageRefused

#: Subdirectory of ``transparent/`` that holds the chunks.
CHUNKS_SUBDIR = "chunks"
PAGE = 4096
#: Fewest and most pages in a chunk (64 KiB .. 2 MiB).
MIN_PAGES, MAX_PAGES = 16, 512
#: A page starts a chunk when its first word's hash falls below this (1 in 64).
_CUT_BELOW = 1 << 58
_MIX, _SALT, _MASK = 0x9E3779B97F4A7C15, 0x5BD1E9955BD1E995, (1 << 64) - 1
#: Bytes read from an image file at a time.
READ_BLOCK = 32 << 20
#: A chunk is compressed when zlib shrinks a probe of its start below this.
PAYS = 0.9
PROBE = 16384
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


def cut_points(buf: bytes | bytearray | memoryview) -> list[int]:
    """Offsets (page multiples) where ``buf`` is cut into chunks, ``len(buf)``
    excluded; the same pages give the same cuts wherever they start (pure)."""
    pages = len(buf) // PAGE
    if pages <= MIN_PAGES:
        return []
    words = memoryview(buf)[:pages * PAGE].cast("Q")[::PAGE // 8].tolist()
    cuts, last = [], 0
    for p, w in enumerate(words):
        if p - last >= MAX_PAGES or (
                p - last >= MIN_PAGES and (((w ^ _SALT) * _MIX) & _MASK) < _CUT_BELOW):
            cuts.append(p * PAGE)
            last = p
    return cuts


def split(path: Path) -> Iterator[bytes]:
    """The chunks of the file at ``path``, in order (read in blocks)."""
    carry = b""
    with open(path, "rb", buffering=0) as f:
        while True:
            data = f.read(READ_BLOCK)
            if not data:
                if carry:
                    yield carry
                return
            buf = carry + data if carry else data
            start = 0
            for cut in cut_points(buf):
                yield buf[start:cut]
                start = cut
            carry = buf[start:]


def encode(raw: bytes) -> bytes:
    """A chunk as stored: zlib level 1 when a probe shows it pays, else raw."""
    if len(zlib.compress(raw[:PROBE], 1)) < PAYS * min(len(raw), PROBE):
        packed = zlib.compress(raw, 1)
        if len(packed) < len(raw):
            return ZLIB + packed
    return RAW + raw


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
        """Store the files; returns each file's chunks (sha256, length) with
        the bytes written for it, and the cost of all. Every new chunk is
        durable when this returns.

        :raises OSError: a read, write or fsync failed (chunks already
            written are unreferenced and go at the next ``collect``).
        """
        known = set(os.listdir(self.dir))
        written = [0, 0]
        sem = threading.BoundedSemaphore(THREADS * 4)

        def put(raw: bytes) -> tuple[str, int, int]:
            try:
                digest = hashlib.sha256(raw).hexdigest()
                with self._lock:
                    new = digest not in known
                    known.add(digest)
                stored = b""
                if new:
                    stored = encode(raw)
                    self._write(digest, stored)
                    with self._lock:
                        written[0] += len(stored)
                        written[1] += 1
                return digest, len(raw), len(stored)
            finally:
                sem.release()

        with ThreadPoolExecutor(THREADS, thread_name_prefix="chunks") as pool:
            futures = []
            for path in paths:
                mine = []
                for raw in split(path):
                    sem.acquire()
                    mine.append(pool.submit(put, raw))
                futures.append(mine)
            done = [[f.result() for f in mine] for mine in futures]
        fsync_dir(self.dir)
        out = [([(h, n) for h, n, _ in items], sum(w for _, _, w in items)) for items in done]
        return out, StoreStats(raw_bytes=sum(n for items in done for _, n, _ in items),
                               written_bytes=written[0], new_chunks=written[1],
                               chunks=sum(map(len, done)))

    def _write(self, digest: str, stored: bytes) -> None:
        tmp = self.dir / f".tmp-{digest}-{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(stored)
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

    def assemble(self, name: str, chunks: list[tuple[str, int]], dest_fd: int,
                 pool: ThreadPoolExecutor) -> None:
        """Write file ``name`` (opened as ``dest_fd``) from its chunks,
        verifying each.

        :raises ImageRefused: a chunk is missing, unreadable or altered
            (names the file and the chunk).
        """
        offsets, at = [], 0
        for _, n in chunks:
            offsets.append(at)
            at += n

        def one(item: tuple[tuple[str, int], int]) -> None:
            (digest, n), offset = item
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
            view = memoryview(raw)
            while view:
                done = os.pwrite(dest_fd, view, offset)
                view, offset = view[done:], offset + done

        for _ in pool.map(one, zip(chunks, offsets)):
            pass
        os.ftruncate(dest_fd, at)

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
