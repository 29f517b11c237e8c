"""Images on disk: atomic publish, verification, retention.

Why a module: an interrupted or corrupt dump must never replace a good image
(issue 15, item 3), and a planted, altered or borrowed one must never be
restored by root (item 5). So CRIU dumps into a fresh root-owned 0700
temporary directory; only after CRIU succeeded are the files hashed
(sha256), the manifest written and signed (HMAC-SHA256 with the root-only
key, ``runtime.signing``), everything fsynced, and the directory renamed to
``image-<seq>``. A reader trusts an image only when the directory is root's,
private, its manifest's MAC verifies and every file's size and sha256 match;
then the manifest must name this job and its user.

Runs as root in the keeper. The job's checkpoint directory itself is the
user's (made by ``runtime.ckptdir`` as the user); the images inside are
root's, so the user can remove or rename an image but not alter one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
from pathlib import Path

from slurm_singularity import contract
from slurm_singularity.runtime import signing
from slurm_singularity.runtime.dirlock import fsync_dir
from slurm_singularity.transparent.api import (
    MANIFEST, TMP_PREFIX, FileEntry, ImageRefused, Manifest, image_name, next_seq, refusal,
    restore_order, to_remove)

log = logging.getLogger(__name__)


def load_key(path: Path) -> bytes:
    """The root-only signing key (made on first use, 0600 root).

    :raises CheckpointKeyError: unsafe or unreadable (names the file).
    """
    return signing.load_key({contract.CKPT_KEY: str(path)})


def new_tmp_dir(images_dir: Path, uid: int) -> Path:
    """A fresh 0700 directory of the job's user for CRIU (which runs as the
    user) to dump into; ``seal`` hands it to root once CRIU is done."""
    path = images_dir / f"{TMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
    os.mkdir(path, 0o700)
    os.chown(path, uid, -1)
    return path


def seal(tmp: Path, gid: int) -> None:
    """Make a finished dump root's: the directory 0750 and its files 0640,
    group the job's (so the user's CRIU can read it at restore, through a
    descriptor root opened, and nobody but root can change it). Anything but
    plain files with one link (a hard link the user kept would let them
    change a file afterwards) is refused.

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


def _sha256(path: Path) -> str:
    with open(path, "rb", buffering=0) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def publish(tmp: Path, manifest: Manifest, key: bytes) -> Path:
    """Hash the files CRIU wrote in ``tmp``, sign the manifest, rename ``tmp``
    to the next ``image-<seq>``. Returns the published path.

    :raises OSError: a write, fsync or rename failed (``tmp`` is left for
        ``prune`` and no image changed).
    """
    files = []
    for entry in sorted(os.scandir(tmp), key=lambda e: e.name):
        if not entry.is_file(follow_symlinks=False) or entry.name == MANIFEST:
            continue
        size = entry.stat(follow_symlinks=False).st_size
        files.append(FileEntry(entry.name, size, _sha256(Path(entry.path)), size))
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    seq = next_seq(os.listdir(tmp.parent))
    unsigned = Manifest(**{**vars(manifest), "files": tuple(files), "seq": seq, "mac": ""})
    signed = Manifest(**{**vars(unsigned), "mac": signing.mac(key, unsigned.signed_bytes())})
    fd = os.open(tmp / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    try:
        os.write(fd, json.dumps(signed.to_dict(), indent=1).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(tmp)
    final = tmp.parent / image_name(seq)
    os.rename(tmp, final)
    fsync_dir(tmp.parent)
    return final


def verify(path: Path, key: bytes, *, job_id: int, uid: int) -> Manifest:
    """The manifest of image ``path`` once everything checks.

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
    on_disk = {e.name for e in os.scandir(path)} - {MANIFEST}
    listed = {f.name for f in manifest.files}
    if on_disk != listed:
        raise ImageRefused(f"{path}: files differ from the manifest "
                           f"({sorted(on_disk ^ listed)[:3]})")
    for f in manifest.files:
        fpath = path / f.name
        fst = os.lstat(fpath)
        if not stat.S_ISREG(fst.st_mode) or fst.st_size != f.size or _sha256(fpath) != f.sha256:
            raise ImageRefused(f"{path}: {f.name} was changed after the dump (size or sha256)")
    return manifest


def newest_good(images_dir: Path, key: bytes, *, job_id: int,
                uid: int) -> tuple[Path, Manifest] | None:
    """The newest image that verifies; each refused one is logged (the job's
    stderr shows why) and skipped."""
    try:
        names = os.listdir(images_dir)
    except FileNotFoundError:
        return None
    for name in restore_order(names):
        try:
            return images_dir / name, verify(images_dir / name, key, job_id=job_id, uid=uid)
        except ImageRefused as exc:
            log.warning("[job %s] transparent: image refused: %s", job_id, exc)
    return None


def prune(images_dir: Path, good: str, keep: int) -> list[str]:
    """Remove older images and stale temporary dumps (never ``good``)."""
    removed = to_remove(os.listdir(images_dir), good, keep)
    for name in removed:
        path = images_dir / name
        if os.lstat(path).st_uid == 0:
            shutil.rmtree(path, ignore_errors=True)
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
