"""The daemon's marks: what it appends to a job's tag in AdminComment.

Why they exist: the daemon keeps no state of its own (invariant 5), so an
action in flight (a resize or preemption: ``resize=D@t``) and the work a
job did in earlier runs (``work=S``) are written into the job itself, where
a restarted daemon (and ``singularity-job``) reads them back.

Why only from the project's own tag: AdminComment is writable by Slurm
operators and other tools. A ``resize=...`` that is not appended to a job
tag that job_submit.lua wrote (``contract.JOB_TAG_PREFIX``) is someone
else's text, and acting on it once got two jobs signalled and FAILED.
Marks are read item by item from the tag's comma-separated fields, never
searched for anywhere in the text.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from .. import contract
from .api import SchedError

_RESIZE = re.compile(r"(\d+)@(\d+(?:\.\d+)?)")
_STEP = re.compile(r"([a-z]+)@(\d+(?:\.\d+)?)")
_WORK = re.compile(r"\d+(?:\.\d+)?")
_SIZE = re.compile(r"[1-9][0-9]{0,5}")


class ResizeStep(enum.Enum):
    """How far the daemon has gone with the action in flight on a job.

    Legal transitions (one per grace period at most)::

        MARKED    -> SIGNALLED (its step runs: sent the tier's signal)
                     | REQUEUED (no step to signal for ``resize_retry_s``)
        SIGNALLED -> REQUEUED (still running one grace time after the signal)
        REQUEUED  -> KILLED   (still running one grace time after the requeue)

    Terminal: KILLED (nothing more is sent). The mark itself is cleared, at
    any step, once Slurm has requeued the job or it runs at the new size.
    """

    MARKED = "unsignalled"
    SIGNALLED = "signalled"
    REQUEUED = "requeued"
    KILLED = "killed"

    @property
    def order(self) -> int:
        return _ORDER[self]

    def can_become(self, other: "ResizeStep") -> bool:
        return other.order > self.order and not (self is ResizeStep.MARKED and
                                                 other is ResizeStep.KILLED)


_ORDER = {ResizeStep.MARKED: 0, ResizeStep.SIGNALLED: 1, ResizeStep.REQUEUED: 2,
          ResizeStep.KILLED: 3}


@dataclass(frozen=True)
class Marks:
    """The daemon's marks in a job's AdminComment.

    ``resize_at`` is when the action was decided; it names the action (a
    restarted daemon, or the journal, tell one action from the next by it).
    ``step_at`` is when its current ``step`` was taken (0: at ``resize_at``);
    the escalation counts the tier's grace time from it.
    """

    tag: str                      # the job tag without the marks
    resize_to: int | None = None  # a resize to this size is in flight (0: preempt)
    resize_at: float = 0.0        # when it was decided (epoch seconds)
    work_s: float = 0.0           # work seconds done before the current run
    step: ResizeStep = ResizeStep.SIGNALLED
    step_at: float = 0.0          # when ``step`` was taken; 0 = ``resize_at``
    #: The last action was a resize to this size, done by a requeue: until
    #: the job runs again the planner counts it at this size (``observe``),
    #: as the simulator keeps a resized job at its new size.
    resized: int | None = None

    @property
    def signalled(self) -> bool:
        return self.step is not ResizeStep.MARKED

    @property
    def step_time(self) -> float:
        return self.step_at or self.resize_at

    def cleared(self, work_s: float | None = None, resized: int | None = None) -> "Marks":
        """The marks without the action in flight (``resized``: it was a
        resize to that size, by a requeue)."""
        return Marks(self.tag, None, 0.0, self.work_s if work_s is None else work_s,
                     resized=resized)

    def at_step(self, step: ResizeStep, when: float) -> "Marks":
        """The marks with the action taken one step further, at ``when``.

        :raises SchedError: ``step`` is not a legal next step of ``self.step``
            (ResizeStep's transitions): the executor never sends a signal,
            requeue or kill out of order.
        """
        if not self.step.can_become(step):
            raise SchedError(f"resize step {self.step.value} -> {step.value} is not a legal "
                             "transition (ResizeStep)")
        return Marks(self.tag, self.resize_to, self.resize_at, self.work_s, step, when)

    def render(self) -> str:
        out = self.tag
        if self.work_s:
            out += f",work={self.work_s:.1f}"
        if self.resized:
            out += f",resized={self.resized}"
        if self.resize_to is not None:
            out += f",resize={self.resize_to}@{self.resize_at:.0f}"
            if self.step is ResizeStep.MARKED:
                out += ",unsignalled"
            elif self.step is not ResizeStep.SIGNALLED or (
                    self.step_at and round(self.step_at) != round(self.resize_at)):
                out += f",step={self.step.value}@{self.step_time:.0f}"
        return out


def read_marks(admin_comment: str | None) -> Marks:
    """The marks of a job tag; an AdminComment that is not a job tag has
    none (it is kept whole as ``tag``). A field that looks like a mark but
    does not parse is left in the tag, and so acted on by nobody."""
    text = (admin_comment or "").strip()
    if not text.startswith(contract.JOB_TAG_PREFIX):
        return Marks(tag=text)
    kept: list[str] = []
    resize_to, resize_at, work, step, step_at = None, 0.0, 0.0, ResizeStep.SIGNALLED, 0.0
    resized = None
    head, *items = text.split(",")
    for item in items:
        key, sep, value = item.partition("=")
        if item == "unsignalled":
            step = ResizeStep.MARKED
        elif key == "resize" and sep and (m := _RESIZE.fullmatch(value)):
            resize_to, resize_at = int(m.group(1)), float(m.group(2))
        elif key == "work" and sep and _WORK.fullmatch(value):
            work = float(value)
        elif key == "resized" and sep and _SIZE.fullmatch(value):
            resized = int(value)
        elif key == "step" and sep and (m := _STEP.fullmatch(value)) and \
                m.group(1) in _STEP_NAMES:
            step, step_at = ResizeStep(m.group(1)), float(m.group(2))
        else:
            kept.append(item)
    if resize_to is None:
        step, step_at = ResizeStep.SIGNALLED, 0.0
    return Marks(",".join([head, *kept]), resize_to, resize_at, work, step, step_at, resized)


_STEP_NAMES = {s.value for s in ResizeStep}
