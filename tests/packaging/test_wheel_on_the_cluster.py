"""The installed wheel against the real local Slurm: the controller-only
install's daemon makes a dry pass over the test cluster, and a job that
trains with the runtime extra (torch, nvidia-ml-py) has a clean output: no
"The pynvml package is deprecated" FutureWarning, which the deprecated
``pynvml`` distribution printed on every import in every job."""

from __future__ import annotations

import pytest

from slurm_singularity import paths

from wheel_env import ok, run

pytestmark = pytest.mark.cluster

TRAIN = paths.REPO_ROOT / "examples" / "train_lm.py"


def test_the_controller_installs_daemon_makes_a_dry_pass_over_the_cluster(
        slurm_cluster, controller, elsewhere):
    proc = ok(run([str(controller / "singularity-schedd"), "--once", "--dry-run",
                   "--journal", str(elsewhere / "journal.jsonl")], elsewhere,
                  env=slurm_cluster.env, timeout=120))
    assert "Traceback" not in proc.stderr
    assert not (elsewhere / "slurm_singularity").exists()


def test_a_job_trained_from_the_wheel_has_no_pynvml_deprecation_warning(
        slurm_cluster, with_runtime, elsewhere):
    out = elsewhere / "job.out"
    step = f"srun {with_runtime / 'singularity-run'} {TRAIN} --steps 2"
    proc = ok(run(["sbatch", "--parsable", "--sla=basic", "--world-size=2", "-N1",
                   "--gres=gpu:1", f"--ckpt-dir={elsewhere / 'ckpt'}", "-o", str(out),
                   "--wrap", step], elsewhere, env=slurm_cluster.env))
    job = int(proc.stdout.strip())
    rec = slurm_cluster.wait_job(job, timeout=180)
    text = out.read_text()
    assert rec["JobState"] == "COMPLETED", (rec, text)
    assert "final step=2" in text, text
    assert "FutureWarning" not in text and "pynvml" not in text, text
