"""singularity-job: run a batch script's training step, and let the
scheduler daemon shrink the job in place instead of requeueing it.

    #SBATCH --elastic=8:32 --world-size=32 -N4 --gres=gpu:8
    singularity-job srun --ntasks-per-node=1 singularity-run train.py

runs the command (the srun step). When the step ends with the requeue code
(its runtime checkpointed on the daemon's signal) and the job carries the
daemon's resize mark (``resize=D`` in AdminComment) for a shrink to whole
nodes, it shrinks its own allocation (``scontrol update
JobId=$SLURM_JOB_ID NumNodes=N``; only from inside the job does scontrol
write the resize script that brings the job's environment up to date),
applies that script's variables and runs the step again on the remaining
nodes, where the runtime restores its checkpoint. The freed nodes go to the
waiting job at once; there is no requeue, no new scheduling and no
credential delay (bench/resize.py: 0.3-0.5 s against 1-2.4 s). Any other end
of the step (finished, failed, a preemption, a resize Slurm 22.05 cannot do
in place: a grow, or a change of GPUs per node) is the job's end, with the
step's exit code, so Slurm requeues it as before.

SIGTERM and SIGUSR1 reaching this process (Slurm's own preemption signals
the batch shell too) are ignored here: srun passes them to the step.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from typing import MutableMapping

from slurm_singularity import contract
from slurm_singularity.slurm import gres
from slurm_singularity.slurm.admin_comment import AdminComment, AdminCommentError
from slurm_singularity.slurm.api import SlurmError
from slurm_singularity.slurm.cli import CliSlurmClient

log = logging.getLogger("singularity-job")

_EXPORT = re.compile(r"^export (\w+)=(.*)$")
_UNSET = re.compile(r"^unset (\w+)$")


def inplace_nodes(record: dict[str, str]) -> int | None:
    """Nodes to shrink to in place, from the job's scontrol record: the
    daemon asks for ``D`` GPUs, the job has ``G`` per node, ``D`` is a
    multiple of ``G`` and fewer nodes than now; else None."""
    try:
        target = AdminComment.parse(record.get("AdminComment", "")).resize_to
    except AdminCommentError as exc:   # not the daemon's to act on: requeue as before
        log.warning("the job's AdminComment is not read: %s", exc)
        return None
    nodes = int(record.get("NumNodes", "0").split("-")[0] or 0)
    try:
        per_node = gres.gpus(record.get("TresPerNode", ""), "scontrol TresPerNode")
    except SlurmError:
        return None
    if not target or nodes < 2:
        return None
    if per_node < 1 or target % per_node or target // per_node >= nodes:
        return None
    return target // per_node


def apply_resize_script(text: str, environ: MutableMapping[str, str]) -> None:
    """Apply the ``export``/``unset`` lines of a Slurm resize script."""
    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if m := _EXPORT.match(line):
            environ[m.group(1)] = " ".join(shlex.split(m.group(2)))
        elif m := _UNSET.match(line):
            environ.pop(m.group(1), None)


def main(argv: list[str] | None = None) -> int:
    cmd = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="singularity-job: %(message)s")
    if not cmd or cmd[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\nusage: singularity-job COMMAND [ARGS...]",
              file=sys.stderr)
        return 2
    job_id = os.environ.get("SLURM_JOB_ID")
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    while True:
        try:
            rc = subprocess.call(cmd, preexec_fn=_default_signals)
        except OSError as exc:
            print(f"singularity-job: cannot run {cmd[0]}: {exc.strerror}", file=sys.stderr)
            return 127
        if rc < 0:                     # killed by a signal: the shell's 128 + N
            rc = 128 - rc
        if rc != contract.REQUEUE_EXIT_CODE or not job_id:
            return rc
        slurm = CliSlurmClient()
        try:
            nodes = inplace_nodes(slurm.show_job(int(job_id)))
            if nodes is None:
                return rc
            apply_resize_script(slurm.shrink_in_place(int(job_id), nodes), os.environ)
        except (SlurmError, ValueError) as exc:
            log.warning("cannot shrink job %s in place (%s); leaving it to a requeue",
                        job_id, exc)
            return rc
        log.info("job %s shrunk in place to %d node(s) (%s); running the step again",
                 job_id, nodes, os.environ.get("SLURM_JOB_NODELIST", "?"))


def _default_signals() -> None:
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
