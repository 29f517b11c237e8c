"""Two SIGTERMs 0.8 s apart (Slurm's preemption signal, then the daemon's
shrink signal; here ``scancel --signal=TERM`` twice, which slurmstepd sends
to every process of the step, the workers included) requeue the job; they
do not fail it. On the real local Slurm: the job is REQUEUED, then COMPLETED
with the parameters of an uninterrupted run, never FAILED."""

from __future__ import annotations

import time

import pytest

from slurm_singularity.runtime.history import read_history

from test_preemption import FINAL, reference_sha, steps_done, submit_training, wait_until

pytestmark = pytest.mark.cluster

STEPS = 16


def _states(cluster, job: int, want: list[str]) -> list[str]:
    deadline = time.monotonic() + 30      # accounting arrives asynchronously
    states = [r.state for r in cluster.client.job_runs(job)]
    while states != want and time.monotonic() < deadline:
        time.sleep(0.5)
        states = [r.state for r in cluster.client.job_runs(job)]
    return states


def test_two_sigterms_0_8_s_apart_requeue_the_job_instead_of_failing_it(
        slurm_cluster, tmp_path):
    want = reference_sha(tmp_path, STEPS)
    job, out, ckpt = submit_training(slurm_cluster, tmp_path, steps=STEPS, ckpt_every=1000)
    wait_until(lambda: steps_done(out) >= 3, 180, "step 3")
    slurm_cluster.client.cancel(job, signal="TERM")
    time.sleep(0.8)
    slurm_cluster.client.cancel(job, signal="TERM")
    rec = slurm_cluster.wait_job(job, timeout=300)
    text = out.read_text()
    assert rec["JobState"] == "COMPLETED", (rec, text[-3000:])
    assert "Traceback" not in text, text[-3000:]
    m = FINAL.search(text)
    assert m and int(m.group(1)) == STEPS and m.group(2) == want, text[-2000:]
    history = read_history(ckpt)
    assert [h.stop.value for h in history] == ["preempted", "finished"], history
    assert history[0].exit_code == 75 and history[0].checkpoint_written
    assert _states(slurm_cluster, job, ["REQUEUED", "COMPLETED"]) == ["REQUEUED", "COMPLETED"]
