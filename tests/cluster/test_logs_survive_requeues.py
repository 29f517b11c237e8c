"""A Singularity job's log keeps every run: the SPANK plugin makes sbatch
open output files in append mode by default (SBATCH_OPEN_MODE=append), so a
requeue after a preemption or a resize no longer truncates what the earlier
runs printed. `--open-mode=truncate` on the command line still wins."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_preemption import premium_burst, wait_until

pytestmark = pytest.mark.cluster

SCRIPT = """#!/bin/bash
echo "run number ${SLURM_RESTART_COUNT:-0} starts"
if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then sleep 300; fi
"""


def preempt_once(cluster, tmp_path: Path, *sbatch: str) -> str:
    """Submit the script as a basic job, let a premium job preempt it once,
    and return its log once the requeued run has finished."""
    script, out = tmp_path / "job.sh", tmp_path / "job.out"
    script.write_text(SCRIPT)
    r = cluster.run("sbatch", "--parsable", "--sla=basic", "--gres=gpu:1", "-o", str(out),
                    *sbatch, str(script), check=True)
    job = int(r.stdout.strip())
    wait_until(lambda: out.exists() and "run number 0 starts" in out.read_text(), 60,
               "the first run to start")
    cluster.wait_job(premium_burst(cluster), timeout=120)
    rec = cluster.wait_job(job, timeout=240)
    assert rec["JobState"] == "COMPLETED", rec
    return out.read_text()


def test_a_preempted_job_s_log_keeps_the_first_run_without_asking_for_append(
        slurm_cluster, tmp_path):
    text = preempt_once(slurm_cluster, tmp_path)
    assert "run number 0 starts" in text, text
    assert "run number 1 starts" in text, text
    assert text.index("run number 0 starts") < text.index("run number 1 starts")


def test_open_mode_truncate_on_the_command_line_still_truncates(slurm_cluster, tmp_path):
    text = preempt_once(slurm_cluster, tmp_path, "--open-mode=truncate")
    assert "run number 1 starts" in text and "run number 0 starts" not in text, text
