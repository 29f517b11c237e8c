"""``history.jsonl``: one record per run of a job, appended, never rewritten.

Why: a job that is preempted and requeued many times has many runs; an
operator (``singularity-admin job show``) wants to see each run's devices,
steps, how it stopped and the work it lost. The file lives in the checkpoint
directory because that is the one place that survives every requeue.

Who writes: ``singularity-run`` (it sees how the workers ended, even a
``kill -9``), from the progress worker 0 reports on a pipe; a worker started
without the launcher records its own run. ``RunProgress`` is that report.

``progress.json`` beside it answers "where is the run now": the current
step, the steps asked for, the rate and so the ETA, rewritten by the same
writer at most every ``PROGRESS_EVERY_S`` seconds while the run goes on, so
that ``job show`` and ``status`` can show a running job's progress without
reading its log. It is advisory: written by rename (never seen half
written) but not fsynced, and a failure to write it is logged, never fatal.
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
PROGRESS_NAME = "progress.json"
#: Seconds between two writes of ``progress.json`` (the first step is
#: written at once).
PROGRESS_EVERY_S = 2.0


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


@dataclass(frozen=True)
class ProgressRecord:
    """A running run's progress, as ``progress.json`` holds it."""

    #: When it was written (seconds since the epoch).
    time: float
    #: When the run started (seconds since the epoch): tells a record of
    #: the current run from one a previous run left.
    start_time: float
    devices: int
    world_size: int
    #: Step restored at the start of the run.
    first_step: int
    #: Completed steps.
    step: int
    #: Steps the script asked for (``trainer.steps(total)``); None: unknown.
    total: int | None
    #: Steps per second since the run's first step; None before two steps.
    rate: float | None

    def eta_s(self) -> float | None:
        """Seconds until ``total`` at ``rate`` from when it was written."""
        if self.total is None or not self.rate:
            return None
        return max(0.0, (self.total - self.step) / self.rate)


def write_progress(ckpt_dir: str | os.PathLike[str], record: ProgressRecord) -> None:
    """Replace ``progress.json`` by rename (0600).

    :raises OSError: it could not be written."""
    path = Path(ckpt_dir) / PROGRESS_NAME
    tmp = path.with_name(f".{PROGRESS_NAME}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with open(fd, "w", encoding="utf-8") as fh:
            json.dump(record.__dict__, fh, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_progress(ckpt_dir: str | os.PathLike[str]) -> ProgressRecord | None:
    """The last progress written in ``ckpt_dir``; None when there is none.

    :raises PermissionError: the directory is private to another user.
    :raises ValueError: the file is malformed (names the field)."""
    path = Path(ckpt_dir) / PROGRESS_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON: {exc}") from None
    try:
        return ProgressRecord(
            time=float(raw["time"]), start_time=float(raw["start_time"]),
            devices=int(raw["devices"]), world_size=int(raw["world_size"]),
            first_step=int(raw["first_step"]), step=int(raw["step"]),
            total=None if raw.get("total") is None else int(raw["total"]),
            rate=None if raw.get("rate") is None else float(raw["rate"]))
    except KeyError as exc:
        raise ValueError(f"{path}: lacks field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: malformed: {exc}") from None


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
    #: Where ``progress.json`` goes; None: nowhere.
    ckpt_dir: Path | None = None
    total: int | None = None
    _rate_origin: tuple[float, int] | None = None   # (time, step) of the first step
    _progress_written: float = 0.0

    def feed(self, line: str) -> None:
        """One report line: ``start <step> [<total>]``, ``step <n>``,
        ``ckpt <n> <reason>``, ``stop <n>`` (trainer.stop() or a break ended
        the run at step n), ``fail <what>`` (a failure the exit code does not
        tell, e.g. a rendezvous that timed out and asks for a requeue)."""
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
            if len(parts) >= 3 and parts[2].isdigit():
                self.total = int(parts[2])
        elif parts[0] == "step":
            self.last_step = n
            self.ckpt_at_stop = False
            self._step_done(n)
        elif parts[0] == "stop":
            self.last_step = n
            self.stopped = True
        elif parts[0] == "ckpt":
            self.last_ckpt_step = n
            self.ckpt_at_stop = True

    def progress(self, now: float) -> ProgressRecord:
        first = self.first_step if self.first_step is not None else 0
        step = self.last_step if self.last_step is not None else first
        rate = None
        if self._rate_origin is not None:
            t0, s0 = self._rate_origin
            if step > s0 and now > t0:
                rate = (step - s0) / (now - t0)
        return ProgressRecord(time=now, start_time=self.start_time, devices=self.devices,
                              world_size=self.world_size, first_step=first, step=step,
                              total=self.total, rate=rate)

    def _step_done(self, step: int) -> None:
        now = time.time()
        if self._rate_origin is None:
            self._rate_origin = (now, step)
        if self.ckpt_dir is None or now - self._progress_written < PROGRESS_EVERY_S:
            return
        self._progress_written = now
        try:
            write_progress(self.ckpt_dir, self.progress(now))
        except OSError as exc:
            log.debug("could not write %s in %s: %s", PROGRESS_NAME, self.ckpt_dir, exc)

    def record(self, stop: StopReason, exit_code: int) -> HistoryRecord:
        first = self.first_step if self.first_step is not None else 0
        last = self.last_step if self.last_step is not None else first
        saved = self.last_ckpt_step if self.last_ckpt_step is not None else first
        return HistoryRecord(
            start_time=self.start_time, end_time=time.time(), devices=self.devices,
            world_size=self.world_size, first_step=first, last_step=last, stop=stop,
            checkpoint_written=self.ckpt_at_stop,
            steps_lost=max(0, last - saved), exit_code=exit_code)
