"""The daemon's write-ahead journal of actions that cannot be taken back.

Why it exists: the daemon's marks live in Slurm (AdminComment), but
slurmctld saves its state every few seconds, not at each update. Killed
with ``kill -9`` 90 ms after the daemon marked a job and signalled it,
slurmctld came back without the mark while the job had the signal: the
daemon, seeing no action in flight, decided the same resize again and
signalled the job a second time (invariant 5: never repeat an action).

So before each step that cannot be undone (a signal, a requeue, a kill),
the daemon appends the step to this journal as an intent (``sent`` false)
and fsyncs it; only then does it call Slurm, then marks the step in Slurm,
then journals it as sent. On every pass it merges what the journal says
into the marks it reads from Slurm (``merge``): a mark Slurm lost is
rebuilt, not decided again, and a step the journal holds as sent is never
taken twice. A step the journal holds only as an intent, and Slurm's mark
does not show, may or may not have reached Slurm (the daemon died around
the call): ``intent`` names it, and the executor takes it again at once
rather than wait a grace time for it. Taken again it still acts once: the
runtime takes a repeated preemption signal as one request (its flag is set,
not counted: ``runtime/job.py``'s ``PreemptFlag``), and Slurm requeues or
kills a run once (the repeat finds the job no longer running, and the
executor only repeats a step on the run it was meant for). The journal holds
only actions in flight (one record per job, the latest), so it stays small,
and an entry for a job whose run it does not describe (another cluster's job
with the same id, a job already restarted) is ignored: without the journal
the daemon still works from Slurm alone, as before.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .marks import Marks, ResizeStep

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JournalEntry:
    """The latest step of the action in flight on one run of a job."""

    job_id: int
    #: Names the action (``Marks.resize_at``).
    resize_at: float
    resize_to: int
    step: ResizeStep
    step_at: float
    #: The job's run: Slurm's start time of the run that got the step, and
    #: its restart count then. A later run of the job is not this run.
    run_start: float
    restarts: int
    #: The action is over (its mark was cleared); kept until the job leaves
    #: Slurm so that a clearing Slurm lost is not taken for a live mark.
    done: bool = False
    #: The step reached Slurm (False: it is about to be taken; a daemon
    #: stopped before it wrote True cannot know whether it did). Lines of
    #: journals written before intents existed read as sent.
    sent: bool = True

    def as_json(self) -> str:
        return json.dumps({"job": self.job_id, "id": self.resize_at, "to": self.resize_to,
                           "step": self.step.value, "at": self.step_at,
                           "run": self.run_start, "restarts": self.restarts,
                           "done": self.done, "sent": self.sent}, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> "JournalEntry":
        """:raises ValueError: not a journal line (KeyError, TypeError too)."""
        d = json.loads(line)
        return cls(int(d["job"]), float(d["id"]), int(d["to"]), ResizeStep(d["step"]),
                   float(d["at"]), float(d["run"]), int(d["restarts"]), bool(d["done"]),
                   bool(d.get("sent", True)))


class Journal:
    """Append-only, fsync'd, one line per step; the latest line per job counts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[int, JournalEntry] = {}
        self._lines = 0
        self._load()

    def _load(self) -> None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            text = ""
        bad = 0
        for line in text.splitlines():
            try:
                e = JournalEntry.from_json(line)
            except (ValueError, KeyError, TypeError):
                bad += 1   # a line torn by a crash mid-write: its step was not taken
                continue
            self.entries[e.job_id] = e
            self._lines += 1
        if bad:
            log.warning("journal %s: skipped %d unreadable line(s)", self.path, bad)
        self._compact()

    def get(self, job_id: int) -> JournalEntry | None:
        return self.entries.get(job_id)

    def record(self, entry: JournalEntry) -> None:
        """Append ``entry`` and fsync before returning.

        :raises OSError: the journal cannot be written (the caller must not
            take the step then).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(entry.as_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries[entry.job_id] = entry
        self._lines += 1
        if self._lines > 4 * len(self.entries) + 64:
            self._compact()

    def keep_only(self, job_ids: set[int]) -> None:
        """Forget the jobs Slurm no longer knows."""
        gone = [j for j in self.entries if j not in job_ids]
        for j in gone:
            del self.entries[j]
        if gone:
            self._compact()

    def _compact(self) -> None:
        """Rewrite the journal with one line per job (temporary file, fsync, rename)."""
        if not self.path.parent.is_dir():
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write("".join(e.as_json() + "\n" for e in self.entries.values()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._lines = len(self.entries)


def same_run(entry: JournalEntry, running: bool, start_time: float, restarts: int) -> bool:
    """Whether the job as Slurm shows it now is the run the entry was
    written for, or its requeue that followed (pending, one restart more)."""
    if running:
        return restarts == entry.restarts and abs(start_time - entry.run_start) < 1.0
    return restarts in (entry.restarts, entry.restarts + 1)


def merge(slurm: Marks, entry: JournalEntry | None) -> Marks:
    """The marks to act on: what Slurm shows, brought forward by the journal.

    - Slurm shows no mark, the journal an action in flight: Slurm lost the
      mark; it is rebuilt from the journal.
    - Both show the same action: the further step counts.
    - The journal says the action is over and Slurm still shows it: Slurm
      lost the clearing; the mark is cleared.
    - Different actions: the later one counts (an unsignalled newer mark has
      no journal entry yet).
    """
    if entry is None:
        return slurm
    if slurm.resize_to is not None and round(slurm.resize_at) != round(entry.resize_at):
        if slurm.resize_at > entry.resize_at:
            return slurm
    if entry.done:
        if slurm.resize_to is not None and round(slurm.resize_at) == round(entry.resize_at):
            return slurm.cleared()
        return slurm
    from_journal = slurm.with_step_of(entry.resize_to, entry.resize_at, entry.step,
                                      entry.step_at)
    if slurm.resize_to is None or round(slurm.resize_at) != round(entry.resize_at):
        return from_journal
    return slurm if slurm.step.order >= entry.step.order else from_journal


def intent(slurm: Marks, entry: JournalEntry | None) -> ResizeStep | None:
    """The step of the action in flight that the journal holds as about to
    be taken (not known to be sent) and that Slurm's mark does not show as
    taken; None when there is none. The marks to act on (``merge``) are at
    that step: the executor takes it again, now (see the module docstring:
    a repeat acts once)."""
    if entry is None or entry.done or entry.sent:
        return None
    marks = merge(slurm, entry)
    if (marks.resize_to is None or round(marks.resize_at) != round(entry.resize_at)
            or marks.step is not entry.step):
        return None
    if (slurm.resize_to is not None and round(slurm.resize_at) == round(entry.resize_at)
            and slurm.step.order >= entry.step.order):
        return None     # Slurm's mark is written only after the step was sent
    return entry.step
