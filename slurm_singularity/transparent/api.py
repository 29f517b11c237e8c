"""Transparent mode's contract: settings, the image manifest, decisions, errors.

Why this subsystem: the runtime (``runtime/``) keeps a job's work only when
the script is written around ``job.trainer``; every other job loses all of
it at a preemption. Transparent mode (``sbatch --transparent``) checkpoints
the batch step's whole process tree with CRIU instead, so the job needs no
change at all: a shell loop, numpy, an unmodified torchrun / gloo DDP script.

How (see ``keeper.py``): the SPANK plugin turns the batch task into a root
*keeper* that starts the user's command, as the user, in a new PID namespace
outside Slurm's process tree (so Slurm's SIGTERM reaches the keeper alone,
and a restore on another node cannot collide with PIDs in use there: the
tree's PIDs are its namespace's, ``tree.py``).
At the preemption signal (the tier's, ``scontrol requeue``, a resize) the
keeper dumps the tree (CRIU freezes all of it at once: one consistent cut),
publishes the image atomically and exits with the requeue code; the next run
restores the newest image that verifies instead of starting the command.

Images are written and signed by root with a key only root can read
(``signing.mac`` over the manifest, which binds the job, the user and the
sha256 of every chunk of every file), so a user cannot plant, alter or borrow an image to
have root restore processes with credentials they never had.

This module is pure: no I/O, so the decisions are tested without CRIU.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

#: Root-only key that signs transparent images (32 bytes, mode 0600, owned by
#: root; made on first use). Every node must hold the same key, as with
#: munge's key: copy it to all nodes.
DEFAULT_KEY_FILE = Path("/etc/slurm-singularity/transparent.key")

#: Least CRIU version that runs on kernels >= 6.13 (the [vvar_vclock] mapping).
MIN_CRIU_VERSION = (4, 1)

#: Subdirectory of the job's checkpoint directory that holds its images.
IMAGES_SUBDIR = "transparent"
IMAGE_PREFIX = "image-"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
#: /2: files are lists of chunks in the job's chunk store (``store.py``).
FORMAT = "slurm-singularity-transparent/2"

#: Field job_submit.lua appends to a transparent job's tag in AdminComment
#: (``contract.JOB_TAG_PREFIX``...): root alone can write AdminComment, so
#: ``singularity-admin status`` can trust it to mark the job transparent.
TAG_FIELD = "transparent=1"


def tagged_transparent(extra: dict[str, str] | None) -> bool:
    """Whether a parsed job tag's extra fields (``contract.JobTag.extra``)
    mark the job transparent."""
    key, _, value = TAG_FIELD.partition("=")
    return (extra or {}).get(key) == value


#: What the user's command gets in its environment so that CRIU can dump it:
#: PyTorch's default libuv TCPStore holds an io_uring descriptor that CRIU
#: refuses ("Unknown shit 600 (anon_inode:[io_uring])").
CRIU_ENVIRONMENT = {"USE_LIBUV": "0"}


class TransparentError(RuntimeError):
    """Root of transparent mode's errors; the message says what to do."""


class SetupError(TransparentError):
    """Transparent mode cannot run here (no working CRIU, several nodes, a
    step other than the batch step); the job fails at once with the reason."""


class ImageRefused(TransparentError):
    """An image is not restored: unsigned, altered, another job's or user's,
    incomplete. The keeper then tries the next older one, else starts anew."""


class DumpFailed(TransparentError):
    """CRIU could not dump the tree; the previous good image stays."""


@dataclass(frozen=True)
class Settings:
    """What one run of the keeper does; built from the job's options."""

    #: Job id (survives requeues); images are bound to it.
    job_id: int
    #: The job's user and group; the command runs and is restored as them.
    uid: int
    gid: int
    #: The job's checkpoint directory (``--ckpt-dir`` or the runtime's default).
    ckpt_dir: Path
    #: Seconds between periodic dumps (``--ckpt-every``); None: only at
    #: preemption. 1 .. 30 days.
    ckpt_every_s: float | None = None
    #: Images kept after a new one is published (the newest good ones), >= 1.
    keep: int = 1

    def __post_init__(self) -> None:
        if self.job_id < 1:
            raise ValueError(f"job_id: expected a positive job id, got {self.job_id}")
        if self.uid < 0 or self.gid < 0:
            raise ValueError(f"uid/gid: expected ids >= 0, got {self.uid}/{self.gid}")
        if not self.ckpt_dir.is_absolute():
            raise ValueError(f"ckpt_dir: expected an absolute path, got {self.ckpt_dir}")
        if self.ckpt_every_s is not None and not 1 <= self.ckpt_every_s <= 30 * 86400:
            raise ValueError(f"ckpt_every_s: expected 1 .. 2592000 seconds, "
                             f"got {self.ckpt_every_s}")
        if self.keep < 1:
            raise ValueError(f"keep: expected at least 1 image kept, got {self.keep}")

    @property
    def images_dir(self) -> Path:
        return self.ckpt_dir / IMAGES_SUBDIR


@dataclass(frozen=True)
class FileEntry:
    """One file of an image as CRIU wrote it, kept in the chunk store."""

    #: CRIU's file name (``pages-1.img``).
    name: str
    #: Bytes this dump wrote to the store for it (its new chunks, compressed).
    size: int
    #: Its size as CRIU wrote it.
    raw_size: int
    #: Its chunks in order: (sha256 of the chunk's bytes, their length).
    chunks: tuple[tuple[str, int], ...] = ()

    def to_dict(self) -> dict:
        return {"name": self.name, "size": self.size, "raw_size": self.raw_size,
                "chunks": [list(c) for c in self.chunks]}


@dataclass(frozen=True)
class Manifest:
    """What an image holds and whom it belongs to; its MAC covers all of it."""

    job_id: int
    uid: int
    gid: int
    seq: int
    #: Wall-clock time of the dump (seconds since the epoch).
    time: float
    #: Seconds the tree was frozen (CRIU's freeze to the end of the dump).
    pause_s: float
    #: "preempt" or "periodic".
    reason: str
    #: Host name of the node that dumped it.
    node: str
    #: The tree's stdout and stderr pipes as CRIU names them ("pipe:[123]"),
    #: replaced by new pipes at restore (``criu restore --inherit-fd``).
    pipes: tuple[str, str]
    files: tuple[FileEntry, ...] = field(default_factory=tuple)
    mac: str = ""

    def signed_bytes(self) -> bytes:
        """The bytes the MAC covers: every field but the MAC, canonical JSON."""
        body = self.to_dict()
        body.pop("mac")
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @property
    def bytes_written(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def raw_bytes(self) -> int:
        return sum(f.raw_size for f in self.files)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "job_id": self.job_id, "uid": self.uid, "gid": self.gid,
                "seq": self.seq, "time": self.time, "pause_s": self.pause_s,
                "reason": self.reason, "node": self.node, "pipes": list(self.pipes),
                "files": [f.to_dict() for f in self.files], "mac": self.mac}

    @classmethod
    def from_dict(cls, data: object) -> "Manifest":
        """:raises ImageRefused: not a manifest of this format (names the field)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ImageRefused(f"manifest: not a {FORMAT} manifest")
        try:
            files = tuple(FileEntry(name=str(f["name"]), size=int(f["size"]),
                                    raw_size=int(f["raw_size"]),
                                    chunks=tuple((str(h), int(n)) for h, n in f["chunks"]))
                          for f in data["files"])
            for f in files:
                if not _SAFE_NAME.fullmatch(f.name):
                    raise ImageRefused(f"manifest: files: unsafe file name {f.name!r}")
                for h, n in f.chunks:
                    if not _CHUNK_HASH.fullmatch(h) or n < 0:
                        raise ImageRefused(f"manifest: files: {f.name}: bad chunk {h[:70]!r}")
                if sum(n for _, n in f.chunks) != f.raw_size:
                    raise ImageRefused(f"manifest: files: {f.name}: chunks do not add up "
                                       f"to raw_size")
            pipes = tuple(str(p) for p in data["pipes"])
            if len(pipes) != 2:
                raise ImageRefused("manifest: pipes: expected two pipes")
            return cls(job_id=int(data["job_id"]), uid=int(data["uid"]),
                       gid=int(data["gid"]), seq=int(data["seq"]), time=float(data["time"]),
                       pause_s=float(data["pause_s"]), reason=str(data["reason"]),
                       node=str(data["node"]), pipes=(pipes[0], pipes[1]), files=files,
                       mac=str(data["mac"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageRefused(f"manifest: malformed ({exc})") from None


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}")
_CHUNK_HASH = re.compile(r"[0-9a-f]{64}")


def image_name(seq: int) -> str:
    return f"{IMAGE_PREFIX}{seq:06d}"


def image_seq(name: str) -> int | None:
    """``image-000012`` -> 12; anything else (a temporary dump) -> None."""
    m = re.fullmatch(rf"{IMAGE_PREFIX}(\d{{6,}})", name)
    return int(m.group(1)) if m else None


def restore_order(names: list[str]) -> list[str]:
    """Published images, newest first: the order in which they are tried."""
    found = [(image_seq(n), n) for n in names]
    return [n for seq, n in sorted(((s, n) for s, n in found if s is not None), reverse=True)]


def next_seq(names: list[str]) -> int:
    seqs = [s for s in (image_seq(n) for n in names) if s is not None]
    return max(seqs, default=0) + 1


def to_remove(names: list[str], good: str, keep: int) -> list[str]:
    """After ``good`` was published: the images beyond the ``keep`` newest,
    and temporary dumps left by an interrupted keeper (never ``good``)."""
    published = restore_order(names)
    older = [n for n in published if n != good][max(keep - 1, 0):]
    stale = [n for n in names if n.startswith(TMP_PREFIX)]
    return older + stale


def refusal(manifest: Manifest, *, job_id: int, uid: int) -> str | None:
    """Why a manifest whose MAC verified must still not be restored for this
    job (pure); None when it may."""
    if manifest.uid != uid:
        return f"it belongs to uid {manifest.uid}, not to the job's user (uid {uid})"
    if manifest.job_id != job_id:
        return f"it was dumped by job {manifest.job_id}, not by this job ({job_id})"
    return None


def user_environment(job_env: dict[str, str]) -> dict[str, str]:
    """The command's environment: the job's, plus what CRIU needs."""
    return {**job_env, **CRIU_ENVIRONMENT}


def parse_criu_version(text: str) -> tuple[int, int] | None:
    """``criu --version``'s output -> (major, minor); None when unreadable."""
    m = re.search(r"^Version:\s*(\d+)\.(\d+)", text, re.MULTILINE)
    return (int(m.group(1)), int(m.group(2))) if m else None


def transparent_requested(argv: list[str], script: str | None) -> bool:
    """Whether sbatch options (or the script's ``#SBATCH`` lines) ask for
    ``--transparent`` (pure; for ``job explain``)."""
    words = list(argv)
    for line in (script or "").splitlines():
        if line.startswith("#SBATCH"):
            words += line[len("#SBATCH"):].split()
    return "--transparent" in words


EXPLAIN_LINE = ("yes: at preemption the batch script's whole process tree is dumped with "
                "CRIU and restored when the job starts again (single node; ask for "
                "--signal=B:USR1@30 to be dumped at once, docs/transparent.md)")
