"""While a training job runs, `singularity-admin job show` and
`singularity-admin status` show its current step, rate and ETA, read from
the `progress.json` that the runtime rewrites every couple of seconds in
the job's checkpoint directory; a requeued job shows its new run's
progress, not the previous run's."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from test_preemption import BIN, premium_burst, steps_done, submit_training, wait_until

pytestmark = pytest.mark.cluster

STEPS = 60
STEP_S = 0.25


def admin(cluster, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([str(BIN / "singularity-admin"), *args], env=cluster.env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_job_show_and_status_show_a_running_job_s_step_rate_and_eta(slurm_cluster, tmp_path):
    job, out, ckpt = submit_training(slurm_cluster, tmp_path, steps=STEPS, step_sleep=STEP_S,
                                       ckpt_every=1000)
    wait_until(lambda: steps_done(out) >= 10, 180, "step 10")
    time.sleep(2.5)                          # one more progress record, with a rate
    printed = steps_done(out)

    show = json.loads(admin(slurm_cluster, "job", "show", str(job), "--json").stdout)
    p = show["progress"]
    assert p is not None, show
    assert p["total"] == STEPS and abs(p["step"] - printed) <= 12, (p, printed)
    # 0.25 s of sleep per step plus the step itself: at most 4 steps/s
    assert 0.5 < p["rate"] <= 1 / STEP_S, p
    assert p["eta_s"] == pytest.approx((STEPS - p["step"]) / p["rate"] - p["age_s"], abs=1), p
    text = admin(slurm_cluster, "job", "show", str(job)).stdout
    assert f"now running on 4 device(s): step " in text and f"/{STEPS}, " in text, text
    assert "steps/s, ETA " in text, text

    status = json.loads(admin(slurm_cluster, "status", "--json").stdout)
    mine = next(j for j in status["jobs"] if j["job_id"] == job)
    assert mine["progress"] is not None and mine["progress"]["total"] == STEPS, mine
    assert mine["progress"]["step"] >= p["step"], (mine, p)
    table = admin(slurm_cluster, "status").stdout
    row = next(line for line in table.splitlines() if line.strip().startswith(str(job)))
    assert f"/{STEPS} " in row and "/s ETA " in row, table

    # after a preemption the progress is the new run's, once it has stepped
    slurm_cluster.wait_job(premium_burst(slurm_cluster), timeout=120)
    wait_until(lambda: "restored step" in out.read_text(), 180, "the requeued run")
    before = show["progress"]["start_time"]
    wait_until(lambda: (json.loads(admin(slurm_cluster, "job", "show", str(job), "--json")
                                   .stdout)["progress"] or {}).get("start_time", 0) > before,
               60, "the new run's progress")
    slurm_cluster.run("scancel", str(job))
