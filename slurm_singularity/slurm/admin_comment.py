"""A job's AdminComment as one typed record: the job tag that job_submit.lua
wrote (``contract.JobTag``) and the scheduler daemon's marks appended to it.

Why one record: the daemon keeps no state of its own (invariant 5), so an
action in flight (a resize or preemption: ``resize=D@t``), how far it has
gone (``unsignalled``, ``step=requeued@t``) and the work a job did in
earlier runs (``work=S``) live in the job itself, where a restarted daemon,
``singularity-admin status`` and ``singularity-job`` read them back. Each of
them reads this record, never the text: one format, one parser.

Why strict, and why only from the project's own tag: users cannot write
AdminComment, but Slurm operators, other tools and older versions of the
daemon can. Text that is not a job tag (``contract.JOB_TAG_PREFIX``) is
someone else's and holds no marks (acting on a stale ``resize=...`` in an
operator's note once got two jobs signalled and FAILED). Inside a tag, a
field named as a mark that does not parse is an error naming the field
(``AdminCommentError``), not a silently ignored or half-read value: the
daemon then leaves the job alone and says why, once. Marks are whole
comma-separated fields, never searched for anywhere in the text.

The text: ``singularity:sla=basic,elastic=8:32,ws=32[,more tag fields]``
then, in this order and each optional, ``work=S`` (seconds, one decimal),
``resized=D``, ``resize=D@T`` (whole epoch seconds; D=0: a preemption) and,
with a resize only, ``unsignalled`` or ``step=NAME@T``.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field

from .. import contract
from .api import SlurmOutputError

#: Largest size a mark may name (the world sizes job_submit.lua accepts).
MAX_SIZE = contract.MAX_WORLD_SIZE
#: Largest work a mark may record, seconds (about 30,000 years of one GPU).
MAX_WORK_S = 1e12

_UINT = re.compile(r"[0-9]{1,9}")
_NUMBER = re.compile(r"[0-9]{1,15}(?:\.[0-9]{1,6})?")


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
_STEP_NAMES = {s.value for s in ResizeStep}
#: The fields that are the daemon's, not the job tag's.
MARK_FIELDS = ("work", "resized", "resize", "step", "unsignalled")


class AdminCommentError(SlurmOutputError):
    """A job's AdminComment holds the project's job tag with a field that
    does not parse: ``field`` (``AdminComment resize``) names it, ``text``
    is the field's text (quoted cut to 80 characters), ``reason`` why."""

    def __init__(self, name: str, text: str, reason: str) -> None:
        super().__init__(f"AdminComment {name}", _quote(text), reason)


def _quote(text: str, limit: int = 40) -> str:
    """``text`` quoted for a message, cut to ``limit`` characters (the
    AdminComment of a job may be 100 KB; its error must not be)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} chars)"


@dataclass(frozen=True)
class AdminComment:
    """A job's AdminComment, read: the job tag and the daemon's marks.

    Built by ``parse`` from Slurm's text, or by the daemon, and written
    back with ``render``; ``parse(render())`` is the record again (times in
    whole seconds, work in tenths). Construction validates every field.

    :raises AdminCommentError: a field is out of range or the fields do not
        agree (marks on text that is not the project's tag, a step without
        a resize); the message names the field.
    """

    #: The job tag as job_submit.lua wrote it, without the marks (kept
    #: verbatim: later versions may add fields); or, when the text is not
    #: a job tag, the whole AdminComment, which is someone else's.
    tag: str
    #: A resize to this many GPUs is in flight; 0: a preemption; None: no
    #: action in flight. 0..MAX_SIZE.
    resize_to: int | None = None
    #: When the action in flight was decided, epoch seconds; it names the
    #: action (a restarted daemon and the journal tell one from the next by
    #: it). 0 when none.
    resize_at: float = 0.0
    #: Work seconds the job did in its runs before the current one (GPU
    #: seconds over its world size); >= 0.
    work_s: float = 0.0
    #: How far the action in flight has gone (SIGNALLED when none).
    step: ResizeStep = ResizeStep.SIGNALLED
    #: When ``step`` was taken, epoch seconds; 0: at ``resize_at``. The
    #: escalation counts the tier's grace time from it.
    step_at: float = 0.0
    #: The last action was a resize to this size, done by a requeue: until
    #: the job runs again the planner counts it at this size (``observe``),
    #: as the simulator keeps a resized job at its new size. None or >= 1.
    resized: int | None = None
    #: ``tag`` read: the job's tier, elastic range and world size; None when
    #: the text is not the project's job tag.
    job_tag: contract.JobTag | None = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.tag, str):
            raise AdminCommentError("tag", str(self.tag), "is not text")
        job_tag = None
        if self.tag.startswith(contract.JOB_TAG_PREFIX):
            _no_marks_in(self.tag)
            try:
                job_tag = contract.parse_job_tag(self.tag)
            except contract.ContractError as exc:
                raise AdminCommentError("tag", self.tag, str(exc)) from None
        object.__setattr__(self, "job_tag", job_tag)
        _check_number("resize_at", self.resize_at)
        _check_number("step_at", self.step_at)
        _check_number("work_s", self.work_s, MAX_WORK_S)
        if not isinstance(self.step, ResizeStep):
            raise AdminCommentError("step", str(self.step), "is not a ResizeStep")
        _check_size("resized", self.resized, 1)
        if self.resize_to is None:
            if self.resize_at or self.step is not ResizeStep.SIGNALLED or self.step_at:
                raise AdminCommentError("step", self.step.value,
                                        "a step or action time without a resize in flight")
        else:
            _check_size("resize", self.resize_to, 0)
            if self.step is ResizeStep.MARKED and self.step_at and \
                    round(self.step_at) != round(self.resize_at):
                raise AdminCommentError("step_at", f"{self.step_at:.0f}",
                                        "an unsignalled action's step is its decision")
        if job_tag is None and (self.resize_to is not None or self.work_s or self.resized):
            raise AdminCommentError("tag", self.tag,
                                    "marks need the project's job tag before them")

    @property
    def tagged(self) -> bool:
        """The text is the project's job tag (only such a job has marks)."""
        return self.job_tag is not None

    @property
    def signalled(self) -> bool:
        return self.step is not ResizeStep.MARKED

    @property
    def step_time(self) -> float:
        return self.step_at or self.resize_at

    def render(self) -> str:
        """The AdminComment text (``parse``'s inverse)."""
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

    @classmethod
    def parse(cls, text: str | None):
        """The record of an AdminComment as Slurm shows it (surrounding
        blanks, which scontrol pads it with, ignored). Text that is not the
        project's job tag is kept whole as ``tag``, with no marks.

        :raises AdminCommentError: a job tag with a malformed field, a mark
            that does not parse or appears twice; names the field.
        """
        text = (text or "").strip()
        if not text.startswith(contract.JOB_TAG_PREFIX):
            return cls(text)
        head, *items = text.split(",")
        kept = [head]
        marks: dict[str, str] = {}
        for item in items:
            key, sep, value = item.partition("=")
            if key not in MARK_FIELDS:
                kept.append(item)
                continue
            if key in marks:
                raise AdminCommentError(key, item, "appears twice")
            if (key == "unsignalled") == bool(sep):
                raise AdminCommentError(key, item, "unsignalled takes no value"
                                        if sep else "is not key=value")
            marks[key] = value
        step, step_at = ResizeStep.SIGNALLED, 0.0
        resize_to, resize_at = None, 0.0
        if "resize" in marks:
            size, at, when = marks["resize"].partition("@")
            if not at:
                raise AdminCommentError("resize", marks["resize"], "is not SIZE@EPOCH")
            resize_to = _uint("resize", size, marks["resize"])
            resize_at = _number("resize", when, marks["resize"])
        elif "step" in marks or "unsignalled" in marks:
            raise AdminCommentError("step" if "step" in marks else "unsignalled",
                                    text, "a step without a resize in flight")
        if "unsignalled" in marks:
            if "step" in marks:
                raise AdminCommentError("step", text, "both unsignalled and step=")
            step = ResizeStep.MARKED
        elif "step" in marks:
            name, at, when = marks["step"].partition("@")
            if not at or name not in _STEP_NAMES or name == ResizeStep.MARKED.value:
                raise AdminCommentError("step", marks["step"],
                                        "is not signalled|requeued|killed@EPOCH")
            step, step_at = ResizeStep(name), _number("step", when, marks["step"])
        work = _number("work", marks["work"]) if "work" in marks else 0.0
        resized = _uint("resized", marks["resized"]) if "resized" in marks else None
        return cls(",".join(kept), resize_to, resize_at, work, step, step_at, resized)


def _no_marks_in(tag: str) -> None:
    for item in tag.split(",")[1:]:
        key = item.partition("=")[0]
        if key in MARK_FIELDS:
            raise AdminCommentError("tag", tag, f"holds the mark {key!r}: marks are fields "
                                    "of the record, not of its tag")


def _uint(name: str, text: str, whole: str | None = None) -> int:
    return int(_matching(name, text, _UINT, "a whole number", whole))


def _number(name: str, text: str, whole: str | None = None) -> float:
    return float(_matching(name, text, _NUMBER, "a number of seconds", whole))


def _matching(name: str, text: str, pattern: re.Pattern[str], what: str,
              whole: str | None) -> str:
    """``text`` when it is all ``pattern``; ``whole``: the field it is part of."""
    if not pattern.fullmatch(text):
        if whole is None:
            raise AdminCommentError(name, text, f"is not {what}")
        raise AdminCommentError(name, whole, f"{_quote(text)} is not {what}")
    return text


def _check_number(name: str, value: float, maximum: float = 1e11) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not 0 <= value <= maximum:
        raise AdminCommentError(name, str(value), f"must be a number of seconds in "
                                f"0..{maximum:g}")


def _check_size(name: str, value: int | None, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or \
            not minimum <= value <= MAX_SIZE:
        raise AdminCommentError(name, str(value), f"must be a size in {minimum}..{MAX_SIZE}")
