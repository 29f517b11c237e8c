"""Act: carry the planner's actions out through Slurm.

A resize (grow or shrink) is the path that always works on Slurm 22.05:
mark the job (``resize=D@t`` in AdminComment), send it the tier's
preemption signal so that the runtime checkpoints at an agreed step boundary
and exits with the requeue code, let Slurm requeue it (``RequeueExit``),
then change the pending job's request to the new size and let it start at
once. A preemption is the same without the size change. A job run under
``singularity-job`` may instead shrink itself in place to whole nodes (no
requeue); the executor then only clears the mark.

Why in this order, never twice in effect (invariant 5), and never late.
The mark goes to Slurm first, saying "not signalled yet": a daemon killed
right after it signals on its next start, with no timeout to wait. Each
step that cannot be undone (signal, requeue, kill) is then journalled
(fsync'd) as an intent, sent, marked in Slurm, and journalled as sent. A
slurmctld killed before it saved the mark loses nothing: the journal says
the step was sent, so it is not sent again. A daemon killed between the
intent and the mark cannot know whether the step reached Slurm; its
successor takes it again on its first pass (``JobView.intent``) instead of
waiting a grace time to find out. That repeat acts once: the runtime takes
a second preemption signal as the same request (issue 19; its handler sets
a flag), and a requeue or kill is repeated only while the same run of the
job is still running. A job that does not stop within its tier's grace
time (``grace_time_s``, as Slurm's GraceTime) is requeued, and one grace
time later killed: one step per grace time, each journalled and marked
before the next pass.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from ..policy.api import Policy
from ..slurm import gres
from ..slurm.api import SlurmClient, SlurmError, SlurmState
from .api import Action, ActionKind, SchedError
from .journal import Journal, JournalEntry
from .marks import Marks, ResizeStep
from .observe import JobView

log = logging.getLogger(__name__)

#: A run that started this long after the mark's last step is a later run
#: than the one marked (a requeue takes Slurm's requeue delay, >= ~10 s);
#: the margin absorbs clock skew between the daemon's host and slurmctld's.
RUN_AFTER_MARK_S = 5.0


@dataclass(frozen=True)
class ExecutorSettings:
    """How the daemon acts on Slurm."""

    #: GPUs per node of the cluster, used to turn a size into nodes x gpus.
    gpus_per_node: int = 8
    #: Seconds a marked job whose step never became ready to signal (a
    #: script that runs no srun step) waits before it is requeued, as
    #: Slurm's own preemption would, losing its run's work. Default 120.
    resize_retry_s: float = 120.0
    #: Log the actions without doing them.
    dry_run: bool = False
    #: Seconds a step must have run before it is signalled: a younger one
    #: may not have installed its signal handlers yet, and the preemption
    #: signal would kill it instead of asking for a checkpoint.
    step_settle_s: float = 3.0
    #: Least seconds between two escalation steps (signal -> requeue ->
    #: kill), for tiers whose ``grace_time_s`` is shorter (premium's 0: it
    #: is never preempted, but it is resized, and its checkpoint takes time).
    #: Default 30.
    min_grace_s: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.gpus_per_node <= 1024:
            raise ValueError(f"--gpus-per-node must be between 1 and 1024, not {self.gpus_per_node}")
        for name in ("resize_retry_s", "step_settle_s", "min_grace_s"):
            value = getattr(self, name)
            if not 0 <= value <= 86400:
                raise ValueError(f"{name} must be between 0 and 86400 s, not {value}")


def request_shape(devices: int, gpus_per_node: int) -> tuple[int, int]:
    """Nodes and GPUs per node for ``devices`` GPUs: the fewest nodes with
    the same count on each (``12`` on 8-GPU nodes -> 2 x 6)."""
    if devices <= gpus_per_node:
        return 1, devices
    for nodes in range(-(-devices // gpus_per_node), devices + 1):
        if devices % nodes == 0 and devices // nodes <= gpus_per_node:
            return nodes, devices // nodes
    return devices, 1


class Executor:
    """Performs actions; each method is safe to call again for the same job."""

    def __init__(self, client: SlurmClient, policy: Policy, settings: ExecutorSettings,
                 clock: Callable[[], float] = time.time,
                 journal: Journal | None = None) -> None:
        self.client = client
        self.policy = policy
        self.settings = settings
        self.clock = clock
        self.journal = journal

    def execute(self, action: Action, view: JobView) -> str:
        """Carry out one action; returns what was done, for the log.

        :raises SlurmError: a Slurm command failed (the caller logs it and
            retries on the next pass; nothing is half-recorded).
        :raises OSError: the journal cannot be written (nothing was sent).
        """
        if self.settings.dry_run:
            return "dry run: nothing done"
        kind = action.kind
        if kind in (ActionKind.GROW, ActionKind.SHRINK):
            return self._begin_resize(view, action.devices_to)
        if kind is ActionKind.PREEMPT:
            return self._begin_resize(view, None)
        if kind is ActionKind.START:
            return self._set_request(view, action.devices_to)
        return "nothing to do"

    # -- resize in three idempotent steps -----------------------------------

    def _begin_resize(self, view: JobView, devices: int | None) -> str:
        """Step 1 and 2: mark the job, then signal it to checkpoint. The
        signal reaches the job's srun steps only (the runtime runs there;
        the batch shell would die of it), so a job whose step has not run
        for ``step_settle_s`` yet stays marked ``unsignalled`` and is
        signalled by ``continue_resize`` once it has."""
        job_id = view.job.job_id
        target = devices if devices is not None else 0
        stepping = self._step_ready(job_id)
        now = self.clock()
        marks = view.marks.begun(target, now, self._work_after_run(view))
        self._write_marks(job_id, marks)
        if not stepping:
            return (f"marked resize to {target}; its step has not run "
                    f"{self.settings.step_settle_s:g} s yet, signal it when it has")
        return f"marked resize to {target} and {self._send_signal(view, marks)}"

    def continue_resize(self, view: JobView) -> str | None:
        """Step 3, for a job carrying a resize mark: once Slurm has requeued
        it, change its request and release it; if it still runs one grace
        time after the signal, requeue it; one more, kill it. Returns what
        was done, or None.

        :raises SlurmError, OSError: as ``execute``.
        """
        marks = view.marks
        if marks.resize_to is None:
            return None
        job_id = view.job.job_id
        state = view.job.state
        if state.pending:
            done = []
            if marks.resize_to and marks.resize_to != view.requested:
                done.append(self._update_size(job_id, marks.resize_to))
            self._clear(view, marks.cleared(resized=marks.resize_to or None))
            if not marks.resize_to:
                done.append("left it pending (preempted)")
            elif view.requeued:
                self.release(view)
                done.append("released it to start now")
            return "requeued; " + "; ".join(done or ["mark cleared"])
        if state != SlurmState.RUNNING:
            return None        # starting or completing: seen anew next pass
        if view.job.start_time > marks.step_time + RUN_AFTER_MARK_S:
            # requeued and started again while the daemon was away: the mark
            # is an earlier run's; this run is planned anew, not escalated
            self._clear(view, marks.cleared())
            return "the job was requeued and started again meanwhile; its earlier run's mark cleared"
        if marks.resize_to and view.devices == marks.resize_to:
            return self._finish_in_place(view)
        if view.intent is not None and view.intent is marks.step:
            return self._take(view, marks, repeat=True)
        now = self.clock()
        if marks.step is ResizeStep.MARKED:
            if self._step_ready(job_id):
                return f"its step runs now; {self._send_signal(view, marks)}"
            if now - marks.resize_at > self.settings.resize_retry_s:
                return self._escalate(view, ResizeStep.REQUEUED,
                                      f"no step to signal after {self.settings.resize_retry_s:g} s")
            return None
        grace = self._grace(view)
        if now - marks.step_time < grace:
            return None
        if marks.step is ResizeStep.SIGNALLED:
            return self._escalate(view, ResizeStep.REQUEUED,
                                  f"still running {grace:g} s after SIG{self._signal_name(view)} "
                                  f"(tier {view.tier.value}'s grace time)")
        if marks.step is ResizeStep.REQUEUED:
            return self._escalate(view, ResizeStep.KILLED,
                                  f"still running {grace:g} s after its requeue")
        return None

    def repair_marks(self, view: JobView) -> str | None:
        """Write the marks to act on back into Slurm where Slurm lost them
        (slurmctld killed before it saved an update the journal holds).

        :raises SlurmError:
        """
        if self.settings.dry_run or view.slurm_marks is None or view.intent is not None:
            return None    # an intended step is marked once taken (continue_resize)
        want = view.marks.render()
        if want == view.slurm_marks.render():
            return None
        self.client.scontrol("update", f"JobId={view.job.job_id}", f"AdminComment={want}")
        return f"Slurm had lost the daemon's mark; restored from the journal ({want!r})"

    def _send_signal(self, view: JobView, marks: Marks) -> str:
        """Signal the job's steps to checkpoint (``_take``)."""
        return self._take(view, marks.at_step(ResizeStep.SIGNALLED, self.clock()))

    def _escalate(self, view: JobView, step: ResizeStep, why: str) -> str:
        """Requeue or kill the job (``_take``)."""
        return f"{why}; {self._take(view, view.marks.at_step(step, self.clock()))}"

    def _take(self, view: JobView, marks: Marks, repeat: bool = False) -> str:
        """Take ``marks.step``: journal it as an intent (fsync'd), send it,
        mark it in Slurm, journal it as sent. ``repeat``: the journal holds
        the intent already, from a daemon that stopped before it knew
        whether the step reached Slurm. Returns what was done."""
        if not repeat:
            self._journal(view, marks, sent=False)
        job_id = view.job.job_id
        action = f"(action {marks.resize_at:.0f})"
        if marks.step is ResizeStep.SIGNALLED:
            self._signal(view)
            what = f"SIG{self._signal_name(view)} {action}"
            done = f"sent {what}"
        elif marks.step is ResizeStep.REQUEUED:
            self.client.scontrol("requeue", str(job_id))
            what = f"its requeue {action}"
            done = f"requeued it {action}: its run's work since its last checkpoint is lost"
        elif marks.step is ResizeStep.KILLED:
            self.client.cancel(job_id, signal="KILL", full=True)
            what = f"its SIGKILL {action}"
            done = f"killed it {action}: SIGKILL to all its processes; Slurm requeues it"
        else:
            raise SchedError(f"resize step {marks.step.value} is not one the executor takes")
        self._write_marks(job_id, marks)
        self._journal(view, marks, sent=True)
        if repeat:
            return (f"repeated {what}: the daemon stopped before it knew whether it reached "
                    "Slurm (a repeat acts once)")
        return done

    def _grace(self, view: JobView) -> float:
        return max(float(self.policy.tiers[view.tier].grace_time_s), self.settings.min_grace_s)

    def _journal(self, view: JobView, marks: Marks, done: bool = False,
                 sent: bool = True) -> None:
        if self.journal is None or marks.resize_to is None:
            return
        self.journal.record(JournalEntry(
            view.job.job_id, marks.resize_at, marks.resize_to, marks.step, marks.step_time,
            view.job.start_time, view.job.restart_count, done, sent))

    def _write_marks(self, job_id: int, marks: Marks) -> None:
        self.client.scontrol("update", f"JobId={job_id}", f"AdminComment={marks.render()}")

    def _clear(self, view: JobView, cleared: Marks) -> None:
        """End the action: the journal first (so that a clearing Slurm loses
        is not taken for a live mark), then Slurm."""
        self._journal(view, view.marks, done=True)
        self._write_marks(view.job.job_id, cleared)

    def _step_ready(self, job_id: int) -> bool:
        return any(age >= self.settings.step_settle_s
                   for _, age in self.client.running_steps(job_id))

    def _finish_in_place(self, view: JobView) -> str:
        """The job shrank itself in place (singularity-job): it runs at the
        new size without a requeue, so only the mark is cleared. Its work
        so far (in the mark) is kept; its start time is the old one, so the
        work counted from it at the new rate is taken off."""
        marks = view.marks
        self._clear(view, marks.cleared(max(0.0, marks.work_s - self._run_work(view))))
        return f"shrunk in place to {view.devices} GPUs by the job itself; mark cleared"

    def _set_request(self, view: JobView, devices: int) -> str:
        if devices == view.requested:
            return "Slurm starts it as requested"
        done = self._update_size(view.job.job_id, devices)
        if view.requeued:      # by Slurm's own preemption
            self.release(view)
            done += "; released it to start now"
        return done

    def _update_size(self, job_id: int, devices: int) -> str:
        nodes, per_node = request_shape(devices, self.settings.gpus_per_node)
        self.client.scontrol("update", f"JobId={job_id}", f"NumNodes={nodes}-{nodes}",
                             f"TresPerNode={gres.request(per_node)}")
        return f"request set to {nodes} node(s) x {per_node} GPU(s)"

    def release(self, view: JobView) -> None:
        """Let a job that the daemon or Slurm's preemption requeued start in
        a second instead of after Slurm's requeue delay (cred_expire + 1 s).
        Any other pending job is left alone: a begin time a user set (a
        ``--begin``) is never overridden.

        Not ``now``: slurmctld revokes a requeued job's credential with the
        time of the requeue in whole seconds, and a new start whose
        credential is from that same second is refused ("Killing
        non-startable batch JobId=N: Job credential revoked") and the job
        ends FAILED instead of running. Seen on Slurm 22.05 when a release
        came 0.7 s after the requeue (bench/resize.py); one second later is
        always a later second."""
        if not view.requeued or view.job.eligible_time <= self.clock() + 1:
            return             # not ours to release, or already released
        job_id = view.job.job_id
        try:
            self.client.scontrol("update", f"JobId={job_id}", "StartTime=now+1")
        except SlurmError as exc:   # already started: nothing to release
            log.debug("[job %s] StartTime=now+1: %s", job_id, exc)

    def _signal(self, view: JobView) -> None:
        self.client.cancel(view.job.job_id, signal=self._signal_name(view))

    def _signal_name(self, view: JobView) -> str:
        return self.policy.tiers[view.tier].signal

    def _work_after_run(self, view: JobView) -> float:
        """Work seconds done up to now, kept in the job across requeues."""
        return view.marks.work_s + self._run_work(view)

    def _run_work(self, view: JobView) -> float:
        """Work seconds of the current run at the job's current size."""
        start = view.job.start_time or self.clock()
        rate = view.devices / view.world_size if view.world_size else 0.0
        return rate * max(0.0, self.clock() - start)
