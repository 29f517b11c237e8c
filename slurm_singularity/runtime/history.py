"""``history.jsonl``: one record per run of a job, appended, never rewritten.

Why: a job that is preempted and requeued many times has many runs; an
operator (``singularity-admin job show``) wants to see each run's devices,
steps, how it stopped and the work it lost. The file lives in the checkpoint
directory because that is the one place that survives every requeue.

Who writes: ``singularity-run`` (it sees how the workers ended, even a
``kill -9``), from the progress worker 0 reports on a pipe; a worker started
without the launcher records its own run. ``RunProgress`` is that report.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock

from slurm_singularity.runtime.api import HistoryRecord, StopReason
from slurm_singularity.runtime.dirlock import lock

log = logging.getLogger(__name__)

HISTORY_NAME = "history.jsonl"


def record_to_json(record: HistoryRecord) -> dict[str, Any]:
    out = dict(record.__dict__)
    out["stop"] = record.stop.value
    return out


def record_from_json(raw: dict[str, Any]) -> HistoryRecord:
    """:raises ValueError: a field is missing or malformed (names it)."""
    try:
        return HistoryRecord(
            start_time=float(raw["start_time"]), end_time=float(raw["end_time"]),
            devices=int(raw["devices"]), world_size=int(raw["world_size"]),
            first_step=int(raw["first_step"]), last_step=int(raw["last_step"]),
            stop=StopReason(raw["stop"]),
            checkpoint_written=bool(raw["checkpoint_written"]),
            steps_lost=int(raw["steps_lost"]), exit_code=int(raw.get("exit_code", 0)))
    except KeyError as exc:
        raise ValueError(f"history record lacks field {exc.args[0]!r}") from None


def append_record(ckpt_dir: str | os.PathLike[str], record: HistoryRecord) -> None:
    """Append one line to ``history.jsonl`` under the directory's lock."""
    path = Path(ckpt_dir) / HISTORY_NAME
    line = json.dumps(record_to_json(record), sort_keys=True) + "\n"
    with lock(ckpt_dir):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with open(fd, "a", encoding="utf-8") as fh:     # 0600 whatever the umask
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


def record_run(ckpt_dir: str | os.PathLike[str], record: HistoryRecord) -> bool:
    """``append_record`` for the end of a run, which must not lose the run's
    exit code: when history cannot be written (a full or read-only file
    system) it says so once on stderr, without a traceback, and returns
    False; the caller still exits with the run's own code."""
    try:
        append_record(ckpt_dir, record)
    except (OSError, filelock.Timeout) as exc:
        print(f"singularity-run: warning: could not record this run ({record.stop.value}, "
              f"exit {record.exit_code}) in {Path(ckpt_dir) / HISTORY_NAME}: {exc}",
              file=sys.stderr, flush=True)
        return False
    return True


def read_history(ckpt_dir: str | os.PathLike[str]) -> list[HistoryRecord]:
    """The runs of the job whose checkpoint directory is ``ckpt_dir``, oldest
    first; [] when there is none yet.

    :raises ValueError: a line is not a valid record (names the line number).
    """
    path = Path(ckpt_dir) / HISTORY_NAME
    if not path.exists():
        return []
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(record_from_json(json.loads(line)))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}:{lineno}: {exc}") from None
    return records


@dataclass
class RunProgress:
    """What one run did so far; fed by worker 0's reports, turned into a
    ``HistoryRecord`` when the run ends."""

    devices: int
    world_size: int
    start_time: float = field(default_factory=time.time)
    first_step: int | None = None
    last_step: int | None = None
    last_ckpt_step: int | None = None
    ckpt_at_stop: bool = False
    failure: str | None = None   # what failed, from a ``fail <what>`` report
    stopped: bool = False        # ended early on purpose (``stop <n>``)

    def feed(self, line: str) -> None:
        """One report line: ``start <step>``, ``step <n>``, ``ckpt <n> <reason>``,
        ``stop <n>`` (trainer.stop() or a break ended the run at step n),
        ``fail <what>`` (a failure the exit code does not tell, e.g. a
        rendezvous that timed out and asks for a requeue)."""
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "fail":
            self.failure = parts[1]
            return
        if len(parts) < 2 or not parts[1].isdigit():
            return
        n = int(parts[1])
        if parts[0] == "start":
            self.first_step = self.last_step = n
            self.last_ckpt_step = n
        elif parts[0] == "step":
            self.last_step = n
            self.ckpt_at_stop = False
        elif parts[0] == "stop":
            self.last_step = n
            self.stopped = True
        elif parts[0] == "ckpt":
            self.last_ckpt_step = n
            self.ckpt_at_stop = True

    def record(self, stop: StopReason, exit_code: int) -> HistoryRecord:
        first = self.first_step if self.first_step is not None else 0
        last = self.last_step if self.last_step is not None else first
        saved = self.last_ckpt_step if self.last_ckpt_step is not None else first
        return HistoryRecord(
            start_time=self.start_time, end_time=time.time(), devices=self.devices,
            world_size=self.world_size, first_step=first, last_step=last, stop=stop,
            checkpoint_written=self.ckpt_at_stop,
            steps_lost=max(0, last - saved), exit_code=exit_code)
