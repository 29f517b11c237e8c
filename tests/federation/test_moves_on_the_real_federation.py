"""The placer moves a running job to another cluster of the real local
federation by itself, under the policy's ``preemption = "daemon"`` (Slurm
preempts nothing itself): a basic W=8 training job on a full east moves to
west when a premium job needs east, and ends with the uninterrupted run's
params_sha256; a real placer process SIGKILLed in the middle of the move
(mid-copy) and restarted finishes it once, from the checkpoint. The
decision itself: test_moving_running_jobs.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from slurm_singularity import paths
from slurm_singularity.sched.federation import federated_checkpoint_dir
from slurm_singularity.sched.migrate import MigrationJournal, MigrationStep, tree_digest

STEPS = 30


@pytest.fixture(scope="module")
def daemon_preemption(local_federation, tmp_path_factory):
    """Both members under the default policy with ``preemption = "daemon"``:
    Slurm preempts nothing by itself, the placer moves running jobs. The
    default policy is put back afterwards."""
    from cluster.test_schedd import apply_policy, daemon_policy

    policy = daemon_policy(tmp_path_factory.mktemp("policy"))
    members = [SimpleNamespace(env=local_federation.env(m.name))
               for m in local_federation.spec.members]
    for m in members:
        apply_policy(m, policy)
    try:
        yield policy
    finally:
        local_federation.cancel_all()
        for m in members:
            apply_policy(m, paths.TEMPLATES_DIR / "policy.toml")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> str:
    """params_sha256 of the training run without any move (outside Slurm)."""
    from cluster.test_preemption import reference_sha

    return reference_sha(tmp_path_factory.mktemp("reference"), STEPS)


def submit_training(fed, tmp_path: Path) -> tuple[int, Path]:
    """A basic W=8 training job on one of east's nodes (8 GPUs), its
    checkpoint every 4 steps under the storage root of the cluster it runs on."""
    from cluster.test_preemption import BIN, TRAIN

    root = fed.spec.state_dir
    script = tmp_path / "train.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --sla=basic --elastic=8:8 --world-size=8 -N1 --gres=gpu:8
export SINGULARITY_CKPT_DIR={root}/$SLURM_CLUSTER_NAME/storage/ckpt/job-$SLURM_JOB_ID
echo "cluster $SLURM_CLUSTER_NAME"
srun --ntasks-per-node=1 {BIN / 'singularity-run'} {TRAIN} --steps {STEPS} --step-sleep 0.3 \\
     --ckpt-every 4
""")
    out = tmp_path / "train.out"
    job = int(fed.run("east", "sbatch", "--parsable", "--clusters=east", "-o", str(out),
                      "--open-mode=append", str(script)).stdout.strip().split(";")[0])
    return job, out


def start_placer(fed, log: Path, **env: str) -> subprocess.Popen:
    """A real `singularity-schedd --federation` process, its log in ``log``."""
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "slurm_singularity.cli.schedd",
                                 "--federation", str(fed.spec.state_dir), "--period", "1",
                                 "--min-run", "5"], stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, **env})


def stop(placer: subprocess.Popen) -> None:
    if placer.poll() is None:
        placer.terminate()
        placer.wait(timeout=30)


def premium_on_east(fed, nodes: int = 2) -> int:
    """A premium job that needs ``nodes`` x 8 GPUs of east and may run only there."""
    return int(fed.run("east", "sbatch", "--parsable", "--clusters=east", "--sla=premium",
                       "--account=research", f"-N{nodes}", "--gres=gpu:8", "-o", "/dev/null",
                       "--wrap", "sleep 30").stdout.strip().split(";")[0])


def resumed_on_west(out: Path) -> int:
    """The step the job restored on west (after it ran on east)."""
    text = out.read_text()
    assert "cluster east" in text and "cluster west" in text, text[-2000:]
    assert text.index("cluster west") > text.index("cluster east")
    m = re.search(r"restored step (\d+)", text.split("cluster west", 1)[1])
    assert m, text[-2000:]
    return int(m.group(1))


@pytest.mark.cluster
def test_a_running_basic_job_moves_to_west_by_itself_so_a_premium_job_starts_on_east(
        fed, daemon_preemption, uninterrupted, tmp_path):
    """east is full: a standard job without a checkpoint on one node, the
    training job on the other. The premium job needs one node: the job
    with a checkpoint is the one moved; the other keeps running."""
    from cluster.test_preemption import FINAL, steps_done

    other = int(fed.run("east", "sbatch", "--parsable", "--clusters=east", "-N1",
                        "--gres=gpu:8", "-o", "/dev/null", "--wrap", "sleep 300"
                        ).stdout.strip().split(";")[0])
    fed.wait_until(lambda: fed.running_on(other) == "east", "the standard job on east")
    job, out = submit_training(fed, tmp_path)
    fed.wait_until(lambda: steps_done(out) >= 6, "step 6 on east", timeout=180)
    log = tmp_path / "placer.log"
    placer = start_placer(fed, log)
    try:
        premium = premium_on_east(fed, nodes=1)
        fed.wait_until(lambda: fed.running_on(premium) == "east", "the premium job on east",
                       timeout=120)
        fed.wait_until(lambda: FINAL.search(out.read_text()), "the job's final line", timeout=240)
    finally:
        stop(placer)
    text = log.read_text()
    assert text.count(f"[job {job}] migrating east -> west: makes room on east for job "
                      f"{premium} (premium, 1x8 GPUs)") == 1, text[-3000:]
    assert f"[job {job}] migrated east -> west" in text
    assert f"[job {other}]" not in text and fed.running_on(other) == "east"
    assert resumed_on_west(out) >= 4
    assert FINAL.search(out.read_text()).group(2) == uninterrupted


@pytest.mark.cluster
def test_a_placer_killed_mid_copy_and_restarted_finishes_the_move_once_without_losing_it(
        fed, daemon_preemption, uninterrupted, tmp_path):
    from cluster.test_preemption import FINAL, steps_done

    job, out = submit_training(fed, tmp_path)
    fed.wait_until(lambda: steps_done(out) >= 6, "step 6 on east", timeout=180)
    first_log, second_log = tmp_path / "placer-1.log", tmp_path / "placer-2.log"
    first = start_placer(fed, first_log, SINGULARITY_MIGRATION_COPY_DELAY_S="120")
    try:
        premium_on_east(fed)
        fed.wait_until(lambda: f"[job {job}] copying its checkpoint" in first_log.read_text(),
                       "the placer to copy the job's checkpoint", timeout=120)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    # what the killed placer left: the step done journaled, the job held on
    # east narrowed to west, a temporary copy on west and no checkpoint there
    relative = federated_checkpoint_dir(job)
    east, west = fed.member("east").storage_root, fed.member("west").storage_root
    (entry,) = MigrationJournal(fed.spec.state_dir / "migrations.json").load().values()
    assert (entry.job_id, entry.step) == (job, MigrationStep.NARROWED)
    assert "FedViableSiblings=west " in fed.show("east", job)
    assert list((west / relative).parent.glob(f".{relative.name}.copy-*"))
    assert not (west / relative).exists() and tree_digest(east / relative)

    second = start_placer(fed, second_log)
    try:
        fed.wait_until(lambda: FINAL.search(out.read_text()), "the job's final line", timeout=240)
    finally:
        stop(second)
    text = second_log.read_text()
    assert f"[job {job}] migrated east -> west" in text, text[-3000:]
    assert f"[job {job}] migrating" not in text                  # no second decision
    assert first_log.read_text().count(f"[job {job}] migrating") == 1
    assert not list((west / relative).parent.glob(f".{relative.name}.*"))
    assert MigrationJournal(fed.spec.state_dir / "migrations.json").load() == {}
    assert resumed_on_west(out) >= 4
    assert FINAL.search(out.read_text()).group(2) == uninterrupted
