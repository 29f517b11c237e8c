"""Act: carry the planner's actions out through Slurm.

A resize (grow or shrink) is the path that always works on Slurm 22.05:
mark the job (``resize=D@t`` in AdminComment), send it the tier's
preemption signal so that the runtime checkpoints at an agreed step boundary
and exits with the requeue code, let Slurm requeue it (``RequeueExit``),
then change the pending job's request to the new size and let it start at
once. A preemption is the same without the size change. A job run under
``singularity-job`` may instead shrink itself in place to whole nodes (no
requeue); the executor then only clears the mark. Every step is
idempotent and its progress is visible in Slurm, so a daemon killed half-way
finishes the resize on restart instead of starting it again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from ..policy.api import Policy
from ..slurm.api import SlurmClient, SlurmError
from .api import Action, ActionKind
from .observe import JobView, Marks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExecutorSettings:
    """How the daemon acts on Slurm."""

    #: GPUs per node of the cluster, used to turn a size into nodes x gpus.
    gpus_per_node: int = 8
    #: Seconds after which a resize still not finished is signalled again
    #: (the job may have missed the signal); should exceed the grace time.
    resize_retry_s: float = 120.0
    #: Log the actions without doing them.
    dry_run: bool = False
    #: Seconds a step must have run before it is signalled: a younger one
    #: may not have installed its signal handlers yet, and the preemption
    #: signal would kill it instead of asking for a checkpoint.
    step_settle_s: float = 3.0


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
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.policy = policy
        self.settings = settings
        self.clock = clock

    def execute(self, action: Action, view: JobView) -> str:
        """Carry out one action; returns what was done, for the log.

        :raises SlurmError: a Slurm command failed (the caller logs it and
            retries on the next pass; nothing is half-recorded).
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
        for ``step_settle_s`` yet is marked ``unsignalled`` and signalled by
        ``continue_resize`` once it has."""
        job_id = view.job.job_id
        target = devices if devices is not None else 0
        stepping = self._step_ready(job_id)
        marks = Marks(view.marks.tag, target, self.clock(), self._work_after_run(view),
                      signalled=stepping)
        self.client.scontrol("update", f"JobId={job_id}", f"AdminComment={marks.render()}")
        if not stepping:
            return (f"marked resize to {target}; its step has not run "
                    f"{self.settings.step_settle_s:g} s yet, signal it when it has")
        self._signal(view)
        return f"marked resize to {target} and sent SIG{self._signal_name(view)}"

    def continue_resize(self, view: JobView) -> str | None:
        """Step 3, for a job carrying a resize mark: once Slurm has requeued
        it, change its request and release it; if it still runs long after
        the signal, signal it again. Returns what was done, or None."""
        marks = view.marks
        if marks.resize_to is None:
            return None
        job_id = view.job.job_id
        if view.job.state in ("PENDING", "REQUEUED"):
            done = []
            if marks.resize_to and marks.resize_to != view.requested:
                done.append(self._update_size(job_id, marks.resize_to))
            cleared = Marks(marks.tag, None, 0.0, marks.work_s)
            self.client.scontrol("update", f"JobId={job_id}", f"AdminComment={cleared.render()}")
            if marks.resize_to:
                self.release(job_id)
                done.append("released it to start now")
            else:
                done.append("left it pending (preempted)")
            return "requeued; " + "; ".join(done)
        if view.job.state == "RUNNING" and marks.resize_to and view.devices == marks.resize_to:
            return self._finish_in_place(view)
        if view.job.state == "RUNNING" and not marks.signalled:
            if self._step_ready(job_id):
                signalled = Marks(marks.tag, marks.resize_to, self.clock(), marks.work_s)
                self.client.scontrol("update", f"JobId={job_id}",
                                     f"AdminComment={signalled.render()}")
                self._signal(view)
                return f"its step runs now; sent SIG{self._signal_name(view)}"
            if self.clock() - marks.resize_at > self.settings.resize_retry_s:
                # no step to warn (a script that runs no srun step): requeue it
                # as Slurm's own preemption would, losing its run's work
                self.client.scontrol("requeue", str(job_id))
                return (f"no step to signal after {self.settings.resize_retry_s:g} s; "
                        "requeued it")
            return None
        if view.job.state == "RUNNING" and self.clock() - marks.resize_at > self.settings.resize_retry_s:
            self._signal(view)
            return f"still running {self.settings.resize_retry_s:g} s after the signal; signalled again"
        return None

    def _step_ready(self, job_id: int) -> bool:
        return any(age >= self.settings.step_settle_s
                   for _, age in self.client.running_steps(job_id))

    def _finish_in_place(self, view: JobView) -> str:
        """The job shrank itself in place (singularity-job): it runs at the
        new size without a requeue, so only the mark is cleared. Its work
        so far (in the mark) is kept; its start time is the old one, so the
        work counted from it at the new rate is taken off."""
        marks = view.marks
        cleared = Marks(marks.tag, None, 0.0, max(0.0, marks.work_s - self._run_work(view)))
        self.client.scontrol("update", f"JobId={view.job.job_id}",
                             f"AdminComment={cleared.render()}")
        return f"shrunk in place to {view.devices} GPUs by the job itself; mark cleared"

    def _set_request(self, view: JobView, devices: int) -> str:
        if devices == view.requested:
            return "Slurm starts it as requested"
        done = self._update_size(view.job.job_id, devices)
        if view.job.reason == "BeginTime":   # requeued (by Slurm's own preemption)
            self.release(view.job.job_id)
            done += "; released it to start now"
        return done

    def _update_size(self, job_id: int, devices: int) -> str:
        nodes, per_node = request_shape(devices, self.settings.gpus_per_node)
        self.client.scontrol("update", f"JobId={job_id}", f"NumNodes={nodes}-{nodes}",
                             f"TresPerNode=gres:gpu:{per_node}")
        return f"request set to {nodes} node(s) x {per_node} GPU(s)"

    def release(self, job_id: int) -> None:
        """Let a requeued job start in a second instead of after Slurm's
        requeue delay (cred_expire + 1 s).

        Not ``now``: slurmctld revokes a requeued job's credential with the
        time of the requeue in whole seconds, and a new start whose
        credential is from that same second is refused ("Killing
        non-startable batch JobId=N: Job credential revoked") and the job
        ends FAILED instead of running. Seen on Slurm 22.05 when a release
        came 0.7 s after the requeue (bench/resize.py); one second later is
        always a later second."""
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
        start = float(view.job.extra.get("start_time") or self.clock())
        rate = view.devices / view.world_size if view.world_size else 0.0
        return rate * max(0.0, self.clock() - start)
