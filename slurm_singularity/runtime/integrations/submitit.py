"""Run a training script under ``singularity-run`` as a submitit job, so that
a preemption requeues it with its work instead of failing it.

Why: submitit always submits with ``--signal=USR2@90`` and, on USR2, calls
a callable that is not ``Checkpointable`` "timed out and not
checkpointable" (every job whose time limit is under 50 minutes counts as
timed out) and ends it FAILED; a ``Checkpointable`` is requeued with
``scontrol requeue`` after its ``checkpoint()`` returned, which knows
nothing of a training step in progress. ``SingularityRun`` is a
``Checkpointable`` that runs the script under ``singularity-run`` in a
child process and treats USR2 as what it is on a Singularity cluster, a
preemption: it asks the runtime to checkpoint (SIGTERM, which the runtime
always takes as a preemption), waits for it, and ends with the requeue code
(``contract.REQUEUE_EXIT_CODE``, slurm.conf's ``RequeueExit``) so that Slurm
requeues the job under the same id. The requeued job runs the same pickled
``SingularityRun``; the runtime restores the newest checkpoint and goes on.
Slurm's own SIGTERM (tier preemption, the daemon) reaches the child
directly; submitit ignores it in its own process. Every task of the step
does the same, so a multi-node job (one task per node) works too.

Usage::

    from slurm_singularity.runtime.integrations.submitit import SingularityRun, sbatch_options
    ex = submitit.SlurmExecutor(folder="logs/%j")
    ex.update_parameters(gres="gpu:4", additional_parameters=sbatch_options(
        sla="basic", world_size=8, elastic="1:4"))
    job = ex.submit(SingularityRun("train.py", "--steps", "1000"))
    record = job.result()      # the last run's HistoryRecord
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

try:
    from submitit.helpers import Checkpointable
except ImportError as exc:   # pragma: no cover - depends on the install
    raise ImportError("slurm_singularity.runtime.integrations.submitit needs submitit: "
                      "pip install 'slurm-singularity[submitit]'") from exc

from slurm_singularity import contract
from slurm_singularity.runtime.api import HistoryRecord

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """``singularity-run`` ended with a code that is neither success nor a
    requeue; submitit reports it as the job's error."""


def sbatch_options(*, sla: str | None = None, world_size: int | None = None,
                   elastic: str | None = None, ckpt_dir: str | None = None,
                   deterministic: bool | None = None) -> dict[str, Any]:
    """The Singularity sbatch options as ``SlurmExecutor``'s
    ``additional_parameters`` (``AutoExecutor``'s
    ``slurm_additional_parameters``; each becomes ``#SBATCH --name=value``);
    the options' syntax is checked by the SPANK plugin at submission."""
    opts: dict[str, Any] = {}
    for name, value in (("sla", sla), ("world-size", world_size), ("elastic", elastic),
                        ("ckpt-dir", ckpt_dir)):
        if value is not None:
            opts[name] = value
    if deterministic is not None:
        opts["deterministic"] = "on" if deterministic else "off"
    return opts


def _singularity_run() -> list[str]:
    """The launcher of this interpreter's install (the job may run with a
    PATH that lacks it)."""
    beside = Path(sys.executable).parent / "singularity-run"
    if beside.exists():
        return [str(beside)]
    return [sys.executable, "-m", "slurm_singularity.cli.run"]


class SingularityRun(Checkpointable):
    """``singularity-run [run_options] script args...`` as a submitit callable.

    ``script``: the training script (a path, run as ``python script``);
    ``args``: its arguments; ``run_options``: options of ``singularity-run``
    itself (``--devices``, ``--ckpt-every-s``, ...; the world size and the
    checkpoint directory come from the job's sbatch options); ``ckpt_dir``:
    where to read the job's history for the result (default: the runtime's,
    from the job id). Calling it returns the last run's ``HistoryRecord``.

    :raises RunFailed: ``singularity-run`` failed (its exit code is named).
    :raises SystemExit: with ``contract.REQUEUE_EXIT_CODE`` after the
        runtime checkpointed for a preemption, so that Slurm requeues the job.
    """

    def __init__(self, script: str | os.PathLike[str], *args: str,
                 run_options: Sequence[str] = (), ckpt_dir: str | None = None) -> None:
        self.script = str(script)
        self.args = [str(a) for a in args]
        self.run_options = [str(o) for o in run_options]
        self.ckpt_dir = ckpt_dir
        self._child: subprocess.Popen[bytes] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_child"] = None          # a process handle does not travel
        return state

    def command(self) -> list[str]:
        return [*_singularity_run(), *self.run_options, self.script, *self.args]

    def _preempt(self, signum: int, _frame: Any = None) -> None:
        """USR2 handler: only forward; the runtime decides the step."""
        child = self._child
        if child is not None and child.returncode is None:
            try:
                os.kill(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def __call__(self) -> HistoryRecord | None:
        job = os.environ.get("SLURM_JOB_ID", "local")
        previous = signal.signal(signal.SIGUSR2, self._preempt)
        try:
            self._child = subprocess.Popen(self.command())
            code = self._child.wait()
        finally:
            signal.signal(signal.SIGUSR2, previous)
            self._child = None
        if code == contract.REQUEUE_EXIT_CODE:
            log.warning("[job %s] singularity-run checkpointed for a preemption; exiting %d "
                        "so that Slurm requeues the job", job, code)
            sys.stdout.flush()
            raise SystemExit(code)
        if code != 0:
            raise RunFailed(f"[job {job}] singularity-run {self.script} failed with exit "
                            f"code {code}")
        return self._last_run()

    def _last_run(self) -> HistoryRecord | None:
        from slurm_singularity.runtime.history import read_history
        from slurm_singularity.runtime.launcher import default_ckpt_dir

        where = Path(self.ckpt_dir) if self.ckpt_dir else default_ckpt_dir(os.environ)
        if where is None:
            return None
        runs = read_history(where)
        return runs[-1] if runs else None

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Reached only when USR2 comes before ``__call__`` installed its
        handler (no training started yet): requeue the same call."""
        return super().checkpoint(*args, **kwargs)
