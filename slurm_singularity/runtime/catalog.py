"""What is in a checkpoint directory, without loading a checkpoint.

Kept apart from ``checkpoint`` (which needs torch) so that tools such as
``singularity-admin job show`` list a job's checkpoints quickly: file names,
the ``CheckpointMeta`` JSON beside each checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from slurm_singularity.runtime.api import CheckpointMeta, CheckpointReason

log = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^ckpt-(\d{8,})\.pt$")


def ckpt_name(step: int) -> str:
    """File name of the checkpoint after ``step`` completed steps."""
    return f"ckpt-{step:08d}.pt"


def meta_name(step: int) -> str:
    return f"ckpt-{step:08d}.json"


def meta_to_json(meta: CheckpointMeta) -> dict[str, Any]:
    out = dict(meta.__dict__)
    out["reason"] = meta.reason.value
    return out


def meta_from_json(raw: dict[str, Any]) -> CheckpointMeta:
    """:raises ValueError: a field is missing or malformed (names it)."""
    try:
        return CheckpointMeta(
            step=int(raw["step"]), wall_time=float(raw["wall_time"]),
            devices=int(raw["devices"]), world_size=int(raw["world_size"]),
            reason=CheckpointReason(raw["reason"]), file=str(raw["file"]),
            bytes=int(raw["bytes"]), checksum=_checksum_field(raw),
            write_s=float(raw.get("write_s", 0.0)))
    except KeyError as exc:
        raise ValueError(f"checkpoint metadata lacks field {exc.args[0]!r}") from None


def _checksum_field(raw: dict[str, Any]) -> str:
    """``checksum``; metadata of format 02 named it ``sha256`` (hex only)."""
    if "checksum" in raw:
        return str(raw["checksum"])
    return "sha256:" + str(raw["sha256"])


def scan(ckpt_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoint files, newest first."""
    directory = Path(ckpt_dir)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _CKPT_RE.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry))
    return sorted(found, reverse=True)


def list_meta(ckpt_dir: str | os.PathLike[str]) -> list[CheckpointMeta]:
    """Metadata of the checkpoints kept in ``ckpt_dir``, newest first;
    unreadable metadata files are skipped with a warning."""
    metas = []
    for step, _ in scan(ckpt_dir):
        path = Path(ckpt_dir) / meta_name(step)
        try:
            metas.append(meta_from_json(json.loads(path.read_text())))
        except (OSError, ValueError) as exc:
            log.warning("checkpoint metadata %s unreadable: %s", path, exc)
    return metas
