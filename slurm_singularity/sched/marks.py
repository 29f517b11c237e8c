"""The daemon's marks: the lifecycle of an action in flight, on the
AdminComment record.

Why here and not beside the record: the record (``slurm/admin_comment.py``)
is the format every reader shares (the daemon, ``singularity-admin status``,
``singularity-job``); how an action moves from one step to the next, and
what is left when it ends, is the daemon's own rule. ``Marks`` is the
record with those two rules; ``read_marks`` is its parser.
"""

from __future__ import annotations

from dataclasses import replace

from ..slurm.admin_comment import AdminComment, AdminCommentError, ResizeStep
from .api import SchedError

__all__ = ["AdminCommentError", "Marks", "ResizeStep", "read_marks"]


class Marks(AdminComment):
    """The AdminComment record with the daemon's transitions."""

    def cleared(self, work_s: float | None = None, resized: int | None = None) -> "Marks":
        """The marks without the action in flight (``resized``: it was a
        resize to that size, by a requeue)."""
        return replace(self, resize_to=None, resize_at=0.0, step=ResizeStep.SIGNALLED,
                       step_at=0.0, resized=resized,
                       work_s=self.work_s if work_s is None else work_s)

    def at_step(self, step: ResizeStep, when: float) -> "Marks":
        """The marks with the action taken one step further, at ``when``.

        :raises SchedError: ``step`` is not a legal next step of ``self.step``
            (ResizeStep's transitions): the executor never sends a signal,
            requeue or kill out of order.
        """
        if not self.step.can_become(step):
            raise SchedError(f"resize step {self.step.value} -> {step.value} is not a legal "
                             "transition (ResizeStep)")
        return replace(self, step=step, step_at=when)

    def begun(self, resize_to: int, when: float, work_s: float) -> "Marks":
        """The marks of a new action, decided at ``when``, not signalled yet."""
        return replace(self, resize_to=resize_to, resize_at=when, work_s=work_s,
                       step=ResizeStep.MARKED, step_at=0.0, resized=None)

    def with_step_of(self, resize_to: int, resize_at: float, step: ResizeStep,
                     step_at: float) -> "Marks":
        """These marks (tag, work) with another action in flight, at ``step``."""
        return replace(self, resize_to=resize_to, resize_at=resize_at, step=step,
                       step_at=step_at, resized=None)


def read_marks(admin_comment: str | None) -> Marks:
    """The AdminComment as Slurm shows it, read (``AdminComment.parse``).

    :raises AdminCommentError: the project's tag with a malformed field.
    """
    return Marks.parse(admin_comment)
