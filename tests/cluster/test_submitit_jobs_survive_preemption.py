"""A job submitted with submitit itself (its SlurmExecutor shells out to
sbatch with `--signal=USR2@90`) keeps its work when preempted, through
`integrations.submitit.SingularityRun`: submitit's own preemption test
(`job._interrupt(timeout=True)`: USR2 alone to the steps, what Slurm sends
90 s before the time limit and which submitit's handler calls "timed out and
not checkpointable") and a tier preemption by a premium job each requeue it
under the same id, it resumes from its checkpoint, ends COMPLETED, and its
parameters are those of the uninterrupted run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_preemption import FINAL, premium_burst, reference_sha, steps_done, wait_until

submitit = pytest.importorskip(
    "submitit", reason="submitit is not installed: pip install 'slurm-singularity[submitit]'")
from slurm_singularity import paths  # noqa: E402
from slurm_singularity.runtime.history import read_history  # noqa: E402
from slurm_singularity.runtime.integrations.submitit import (  # noqa: E402
    SingularityRun, sbatch_options,
)

pytestmark = pytest.mark.cluster

TRAIN = paths.REPO_ROOT / "examples" / "train_lm.py"
STEPS = 30


def test_a_submitit_job_preempted_twice_ends_completed_with_the_uninterrupted_result(
        slurm_cluster, tmp_path, monkeypatch):
    want = reference_sha(tmp_path, STEPS)
    for name, value in slurm_cluster.spec.env().items():
        monkeypatch.setenv(name, value)       # submitit runs sbatch and sacct itself
    ckpt = tmp_path / "ckpt"
    executor = submitit.SlurmExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(
        nodes=1, ntasks_per_node=1, gres="gpu:4",   # submitit's default time: 5 min
        additional_parameters=sbatch_options(sla="basic", world_size=8, elastic="1:4",
                                                   ckpt_dir=str(ckpt)))
    job = executor.submit(SingularityRun(TRAIN, "--steps", str(STEPS), "--step-sleep", "0.25",
                                         ckpt_dir=str(ckpt)))
    out = Path(str(job.paths.stdout).replace("%j", job.job_id))
    err = Path(str(job.paths.stderr).replace("%j", job.job_id))

    wait_until(lambda: steps_done(out) >= 3, 180, "step 3")
    job._interrupt(timeout=True)               # USR2 alone
    wait_until(lambda: err.read_text().count("restored step") >= 1, 180,
               "the job to come back after submitit's preemption")
    wait_until(lambda: steps_done(out) >= 15, 180, "step 15")
    slurm_cluster.wait_job(premium_burst(slurm_cluster), timeout=120)

    rec = slurm_cluster.wait_job(int(job.job_id), timeout=300)
    assert rec["JobState"] == "COMPLETED", rec
    text = out.read_text()
    m = FINAL.search(text)
    assert m and int(m.group(1)) == STEPS, text[-3000:]
    assert m.group(2) == want, "the preempted submitit job differs from the uninterrupted run"
    history = read_history(ckpt)
    assert [h.stop.value for h in history] == ["preempted", "preempted", "finished"], history
    assert all(h.checkpoint_written and h.steps_lost == 0 for h in history[:2]), history
    # what submitit's user gets back: the last run's record, no error
    result = job.result()
    assert result.stop.value == "finished" and result.last_step == STEPS, result
    log = err.read_text()
    assert "Exited with exit code 75" in log, log[-3000:]
    assert not re.search(r"Job not requeued|UncompletedJobError", log), log[-3000:]
