"""Images on disk: atomic publish, verification, retention.

Why a module: an interrupted or corrupt dump must never replace a good image
(issue 15, item 3), and a planted, altered or borrowed one must never be
restored by root (item 5). So CRIU dumps into a fresh staging directory
(node-local memory, ``/dev/shm``, when it has room: the pause is then not
bound by the disk); only after CRIU succeeded does root take the files
over, store them as chunks (``store.py``: deduplicated across ranks and
dumps, compressed where it pays, only new chunks written and fsynced), write
the manifest that lists every file's chunks and sign it (HMAC-SHA256 with
the root-only key, ``runtime.signing``), fsync it and rename its directory
to ``image-<seq>``. A reader trusts an image only when the directory is
root's, private, its manifest's MAC verifies and names this job and its
user, and every chunk it lists is present; each chunk's sha256 is checked
as the files are rebuilt for CRIU (``materialize``).

Runs as root in the keeper. The job's checkpoint directory itself is the
user's (made by ``runtime.ckptdir`` as the user); ``transparent/`` inside,
with its images and chunks, is root's, so the user can remove or rename
it but not alter an image.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from slurm_singularity import contract
from slurm_singularity.runtime import signing
from slurm_singularity.runtime.dirlock import fsync_dir
from slurm_singularity.transparent import store
from slurm_singularity.transparent.api import (
    MANIFEST, TMP_PREFIX, FileEntry, ImageRefused, Manifest, image_name, next_seq, refusal,
    restore_order, to_remove)

log = logging.getLogger(__name__)


def load_key(path: Path) -> bytes:
    """The root-only signing key (made on first use, 0600 root).

    :raises CheckpointKeyError: unsafe or unreadable (names the file).
    """
    return signing.load_key({contract.CKPT_KEY: str(path)})


def seal(tmp: Path, gid: int) -> None:
    """Make a finished dump's staging directory root's before root reads it
    into the store (the directory 0750 and its files 0640, group the
    job's). Anything but plain files with one link (a hard link the user
    kept would let them change a file afterwards) is refused.

    :raises OSError: a file is not a plain file with one link.
    """
    os.chown(tmp, 0, gid)
    os.chmod(tmp, 0o750)
    for entry in os.scandir(tmp):
        st = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise OSError(f"{entry.name} in the dump is not a plain file with one link")
        os.chown(entry.path, 0, gid, follow_symlinks=False)
        os.chmod(entry.path, 0o640, follow_symlinks=False)


#: Node-local memory file system where CRIU dumps and restores read from
#: when it has room (the pause is then not bound by the disk).
STAGING_ROOT = Path("/dev/shm")
#: Room left free on ``STAGING_ROOT`` besides an image (bytes).
STAGING_MARGIN = 256 << 20


def staging_parent(images_dir: Path, need_bytes: int) -> Path:
    """``STAGING_ROOT`` when it has room for ``need_bytes``, else the images
    directory (same file system as the store)."""
    try:
        st = os.statvfs(STAGING_ROOT)
        if st.f_bavail * st.f_frsize >= need_bytes * 1.2 + STAGING_MARGIN:
            return STAGING_ROOT
    except OSError:
        pass
    return images_dir


def staging_prefix(job_id: int) -> str:
    return f"singularity-transparent-{job_id}-"


def clear_staging(job_id: int) -> None:
    """Remove staging directories a killed keeper of this job left behind."""
    try:
        names = os.listdir(STAGING_ROOT)
    except OSError:
        return
    for name in names:
        if name.startswith(staging_prefix(job_id)):
            path = STAGING_ROOT / name
            if stat.S_ISDIR(os.lstat(path).st_mode):
                shutil.rmtree(path, ignore_errors=True)


def new_staging_dir(parent: Path, job_id: int, uid: int) -> Path:
    """A fresh 0700 directory of the job's user for CRIU (as the user) to
    dump into, in ``parent`` (``staging_parent``)."""
    prefix = TMP_PREFIX if parent != STAGING_ROOT else staging_prefix(job_id)
    path = parent / f"{prefix}dump-{os.getpid()}-{os.urandom(4).hex()}"
    os.mkdir(path, 0o700)
    os.chown(path, uid, -1)
    return path


def new_pending(images_dir: Path) -> Path:
    """The directory a dump's manifest is written into before it is renamed
    to ``image-<seq>`` (root's, 0700); made when the dump begins, so an
    interrupted dump is visible (and removed by ``prune``)."""
    path = images_dir / f"{TMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
    os.mkdir(path, 0o700)
    return path


def publish(staging: Path, pending: Path, manifest: Manifest, key: bytes,
            batch: store.Batch) -> tuple[Path, store.StoreStats]:
    """Store the files CRIU wrote in ``staging`` as chunks (``batch`` may
    hold some already, stored while CRIU wrote the others), sign the manifest
    that lists them, write it into ``pending``, rename that to the next
    ``image-<seq>``. The manifest is written only after every new chunk is
    durable. Returns the published path and what storing cost.

    :raises OSError: a read, write, fsync or rename failed (no image changed).
    """
    names = sorted(e.name for e in os.scandir(staging)
                   if e.is_file(follow_symlinks=False) and e.name != MANIFEST)
    stored, stats = batch.finish([staging / n for n in names])
    files = tuple(FileEntry(name=n, size=written, raw_size=sum(c for _, c in cl),
                            chunks=tuple(cl))
                  for n, (cl, written) in zip(names, stored))
    seq = next_seq(os.listdir(pending.parent))
    unsigned = Manifest(**{**vars(manifest), "files": files, "seq": seq, "mac": ""})
    signed = Manifest(**{**vars(unsigned), "mac": signing.mac(key, unsigned.signed_bytes())})
    fd = os.open(pending / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                 0o600)
    try:
        os.write(fd, json.dumps(signed.to_dict(), separators=(",", ":")).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(pending)
    final = pending.parent / image_name(seq)
    os.rename(pending, final)
    fsync_dir(pending.parent)
    return final, stats


def verify(path: Path, key: bytes, *, job_id: int, uid: int) -> Manifest:
    """The manifest of image ``path`` once it checks: root's and private,
    signed, this job's and user's, every chunk present (their bytes are
    checked as they are read: ``materialize``).

    :raises ImageRefused: the message says what failed.
    """
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ImageRefused(f"{path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or stat.S_IMODE(st.st_mode) & 0o027:
        raise ImageRefused(f"{path}: not a private directory of root's (images are written "
                           f"by root only)")
    try:
        raw = (path / MANIFEST).read_bytes()
        manifest = Manifest.from_dict(json.loads(raw))
    except (OSError, ValueError) as exc:
        raise ImageRefused(f"{path}: no readable manifest ({exc})") from None
    if not signing.verify(key, manifest.signed_bytes(), manifest.mac):
        raise ImageRefused(f"{path}: the signature does not verify: the image was altered "
                           f"or not written by this cluster's keeper")
    why = refusal(manifest, job_id=job_id, uid=uid)
    if why is not None:
        raise ImageRefused(f"{path}: {why}")
    chunks = store.ChunkStore(path.parent)
    for f in manifest.files:
        gone = chunks.missing(list(f.chunks))
        if gone is not None:
            raise ImageRefused(f"{path}: {f.name}: chunk {gone[:16]} is missing from the store")
    return manifest


def materialize(image: Path, manifest: Manifest, gid: int, job_id: int) -> Path:
    """CRIU's files of a verified image, rebuilt from the store into a new
    directory (root's, 0750, group the job's, so the user's CRIU reads it
    through a descriptor root opened), each chunk checked as it is read.
    The caller removes it (``discard``) once the tree is restored.

    :raises ImageRefused: a chunk is missing or altered (names the file).
    """
    parent = staging_parent(image.parent, sum(f.raw_size for f in manifest.files))
    prefix = TMP_PREFIX if parent != STAGING_ROOT else staging_prefix(job_id)
    dest = parent / f"{prefix}restore-{os.getpid()}-{os.urandom(4).hex()}"
    os.mkdir(dest, 0o700)
    chunks = store.ChunkStore(image.parent)
    fds: list[int] = []
    try:
        for f in manifest.files:
            fds.append(os.open(dest / f.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                               | os.O_NOFOLLOW, 0o640))
            os.fchown(fds[-1], 0, gid)
        with ThreadPoolExecutor(store.THREADS, thread_name_prefix="restore") as pool:
            chunks.assemble([(f.name, list(f.chunks), fd)
                             for f, fd in zip(manifest.files, fds)], pool)
        os.chown(dest, 0, gid)
        os.chmod(dest, 0o750)
    except ImageRefused as exc:
        discard(dest)
        raise ImageRefused(f"{image}: {exc}") from None
    except OSError:
        discard(dest)
        raise
    finally:
        for fd in fds:
            os.close(fd)
    return dest


def discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def newest_good(images_dir: Path, key: bytes, *, job_id: int, uid: int,
                gid: int) -> tuple[Path, Manifest, Path] | None:
    """The newest image that verifies: its path, manifest and its files
    rebuilt for CRIU (``materialize``); each refused one is logged (the
    job's stderr shows why) and skipped."""
    try:
        names = os.listdir(images_dir)
    except FileNotFoundError:
        return None
    for name in restore_order(names):
        try:
            manifest = verify(images_dir / name, key, job_id=job_id, uid=uid)
            files = materialize(images_dir / name, manifest, gid, job_id)
            return images_dir / name, manifest, files
        except ImageRefused as exc:
            log.warning("[job %s] transparent: image refused: %s", job_id, exc)
    return None


def prune(images_dir: Path, good: str, keep: int) -> list[str]:
    """Remove older images and stale temporary dumps (never ``good``), then
    the chunks no remaining image names. Manifests go first, so a kill at
    any point leaves every kept image whole."""
    removed = to_remove(os.listdir(images_dir), good, keep)
    for name in removed:
        path = images_dir / name
        if os.lstat(path).st_uid == 0:
            shutil.rmtree(path, ignore_errors=True)
    collect_garbage(images_dir)
    return removed


def collect_garbage(images_dir: Path) -> int:
    """Remove the chunks no published image's manifest names (read without
    the key: a chunk named by any manifest on disk stays); the chunk
    directory itself when no image is left. Returns the chunks removed."""
    referenced: set[str] = set()
    published = restore_order(os.listdir(images_dir))
    for name in published:
        try:
            data = json.loads((images_dir / name / MANIFEST).read_bytes())
            referenced.update(str(h) for f in data["files"] for h, _ in f["chunks"])
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("transparent: %s has an unreadable manifest; no chunk is removed",
                        images_dir / name)
            return 0
    chunks_dir = images_dir / store.CHUNKS_SUBDIR
    if not chunks_dir.is_dir():
        return 0
    removed = store.ChunkStore(images_dir).collect(referenced)
    if not published:
        try:
            os.rmdir(chunks_dir)
        except OSError:
            pass
    return removed


def list_manifests(images_dir: Path) -> list[Manifest]:
    """Manifests of the published images, oldest first, unverified (for
    ``job show``, which needs no key)."""
    out = []
    try:
        names = os.listdir(images_dir)
    except OSError:
        return out
    for name in reversed(restore_order(names)):
        try:
            out.append(Manifest.from_dict(json.loads((images_dir / name / MANIFEST).read_bytes())))
        except (OSError, ValueError, ImageRefused):
            continue
    return out
