"""A job on two nodes of the real local Slurm, without ``MASTER_ADDR`` in its
script: the node names (``n3``) do not resolve, so the devices must meet at
the ``NodeAddr`` Slurm gives. Its first run is told a rendezvous address
that cannot work: that run fails its rendezvous within
``SINGULARITY_RENDEZVOUS_TIMEOUT_S`` and is requeued (not hung holding its
GPUs); the next run meets at the NodeAddr, trains, is preempted by a premium
job, and the last run ends with the parameters of an uninterrupted run."""

from __future__ import annotations

import pytest

from slurm_singularity.runtime.history import read_history

from test_double_sigterm import _states
from test_preemption import (
    BIN, FINAL, TRAIN, premium_burst, reference_sha, steps_done, wait_until,
)

pytestmark = pytest.mark.cluster

STEPS = 16
TIMEOUT_S = 8


def test_a_two_node_job_meets_at_the_node_address_and_a_failed_rendezvous_is_requeued(
        slurm_cluster, tmp_path):
    want = reference_sha(tmp_path, STEPS)
    ckpt, out, script = tmp_path / "ckpt", tmp_path / "train.out", tmp_path / "train.sh"
    # run 1 only: an address in TEST-NET-1 (RFC 5737), where nothing answers
    script.write_text(f"""#!/bin/bash
#SBATCH --sla=basic --elastic=2:4 --world-size=8 -N2 --gres=gpu:2
unset MASTER_ADDR
export SINGULARITY_RENDEZVOUS_TIMEOUT_S={TIMEOUT_S}
if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then export MASTER_ADDR=192.0.2.1; fi
echo "run ${{SLURM_RESTART_COUNT:-0}} on $SLURM_JOB_NODELIST"
srun --ntasks-per-node=1 {BIN / 'singularity-run'} {TRAIN} --steps {STEPS} --step-sleep 0.25
""")
    r = slurm_cluster.run("sbatch", "--parsable", f"--ckpt-dir={ckpt}", "-o", str(out),
                          "--open-mode=append", str(script), check=True)
    job = int(r.stdout.strip())
    wait_until(lambda: out.exists() and "run 1 on" in out.read_text(), 120,
               "the failed rendezvous to requeue the job")
    text = out.read_text()
    assert "rendezvous of 4 devices at 192.0.2.1" in text and "requeue" in text, text[-3000:]
    first = slurm_cluster.client.job_runs(job)[0]
    assert first.elapsed_s <= TIMEOUT_S + 20, first

    wait_until(lambda: steps_done(out) >= 4, 180, "step 4 of the run at NodeAddr")
    slurm_cluster.wait_job(premium_burst(slurm_cluster), timeout=120)
    rec = slurm_cluster.wait_job(job, timeout=300)
    text = out.read_text()
    assert rec["JobState"] == "COMPLETED", (rec, text[-3000:])
    m = FINAL.search(text)
    assert m and int(m.group(1)) == STEPS and m.group(2) == want, text[-2000:]
    history = read_history(ckpt)
    assert [(h.stop.value, h.devices) for h in history] == [
        ("failed", 4), ("preempted", 4), ("finished", 4)], history
    assert history[0].exit_code == 75 and history[2].first_step == history[1].last_step > 0
    assert _states(slurm_cluster, job, ["REQUEUED"] * 2 + ["COMPLETED"]) == \
        ["REQUEUED"] * 2 + ["COMPLETED"]
