"""A LightningModule trained with `Trainer(strategy=SingularityStrategy())`
as a basic job on the real local Slurm is preempted by a premium job,
requeued, resumes from its checkpoint on the devices it gets, and ends
COMPLETED with the parameters of an uninterrupted run."""

from __future__ import annotations

import re
import subprocess

import pytest
from test_preemption import BIN, premium_burst, wait_until

pytest.importorskip("pytorch_lightning",
                    reason="pytorch-lightning is not installed: "
                           "pip install 'slurm-singularity[lightning]'")
from slurm_singularity import paths  # noqa: E402
from slurm_singularity.runtime.history import read_history  # noqa: E402

pytestmark = pytest.mark.cluster

SCRIPT = paths.REPO_ROOT / "tests" / "integrations" / "lightning_script.py"
FINAL = re.compile(r"final step=(\d+) global_step=\d+ params_sha256=([0-9a-f]{64})")
STEPS = 30


def test_a_lightning_job_preempted_on_slurm_ends_with_the_uninterrupted_result(
        slurm_cluster, tmp_path):
    ref = subprocess.run([str(BIN / "singularity-run"), "--devices", "2", "--world-size", "8",
                          "--ckpt-dir", str(tmp_path / "ref"), str(SCRIPT), "--steps", str(STEPS)],
                         capture_output=True, text=True, timeout=300)
    want = FINAL.search(ref.stdout)
    assert want, ref.stdout + ref.stderr[-3000:]
    ckpt, out = tmp_path / "ckpt", tmp_path / "job.out"
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --sla=basic --elastic=1:4 --world-size=8 -N1 --gres=gpu:4
srun --ntasks-per-node=1 {BIN / 'singularity-run'} {SCRIPT} --steps {STEPS} --step-sleep 0.3
""")
    r = slurm_cluster.run("sbatch", "--parsable", f"--ckpt-dir={ckpt}", "-o", str(out),
                          str(script), check=True)
    job = int(r.stdout.strip())
    wait_until(lambda: (ckpt / "progress.json").exists(), 180, "the first steps")
    slurm_cluster.wait_job(premium_burst(slurm_cluster), timeout=120)
    rec = slurm_cluster.wait_job(job, timeout=300)
    assert rec["JobState"] == "COMPLETED", rec
    text = out.read_text()
    m = FINAL.search(text)
    assert m and int(m.group(1)) == STEPS, text[-3000:]
    assert m.group(2) == want.group(2), "the preempted Lightning job differs from the reference"
    history = read_history(ckpt)
    assert [h.stop.value for h in history] == ["preempted", "finished"], history
    assert history[0].checkpoint_written and history[1].first_step == history[0].last_step > 0
