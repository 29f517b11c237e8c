"""Issue 17, item 3: a DataLoader with 2 workers and an IterableDataset
(read in the main process, or by 2 workers) feed every logical rank the
micro-batches it gets on one device, and a run preempted mid-epoch and
resumed on 1 -> 2 -> 4 devices reads exactly the batches of an
uninterrupted run and ends with its parameters."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from slurm_singularity import contract
from slurm_singularity.runtime import checkpoint
from slurm_singularity.runtime.api import StopReason
from slurm_singularity.runtime.history import read_history

import runtime_harness as harness

PIPELINE = str(Path(__file__).with_name("pipeline_worker.py"))
W = 4
STEPS = 12
# 60 samples, W=4, batch 3: 15 samples per rank, 5 micro-batches per epoch
ARGS = ("--samples", "60", "--batch-size", "3", "--steps", str(STEPS))
SHARD = 15


def batches(out: str) -> dict[tuple[int, int], str]:
    """(step, logical rank) -> digest of the micro-batch it trained on;
    fails if a step and rank was read twice with different contents."""
    seen: dict[tuple[int, int], str] = {}
    for line in out.splitlines():
        if line.startswith("batch "):
            _, step, rank, digest = line.split()
            key = (int(step), int(rank))
            assert seen.setdefault(key, digest) == digest, (key, seen[key], digest)
    return seen


@pytest.mark.parametrize("data,workers", [("loader", 2), ("iterable", 0), ("iterable", 2)])
def test_a_pipeline_preempted_mid_epoch_and_resumed_on_1_2_4_devices_reads_the_batches_of_one_run(
        tmp_path, data, workers):
    args = ("--data", data, "--workers", str(workers), *ARGS)
    reference = harness.run(PIPELINE, tmp_path / "reference", 1, W, *args)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = batches(reference.stdout)
    assert sorted(expected) == [(s, r) for s in range(1, STEPS + 1) for r in range(W)]

    ckpt = tmp_path / "resumed"
    read: list[str] = []
    restored = 0
    for devices, stop_at in ((1, 2), (2, 7)):
        code, seen, out, err = harness.run_and_preempt(
            PIPELINE, ckpt, devices, W, stop_at, *args, "--step-sleep", "0.3")
        assert code == contract.REQUEUE_EXIT_CODE, err[-3000:]
        read.append(out)
        step, state = checkpoint.load_latest(ckpt)
        assert step > restored
        restored = step
        epoch, position = state["ranks"][0]["cursor"]
        assert 0 < position < SHARD, f"preempted at an epoch boundary ({epoch}, {position})"
    done = harness.run(PIPELINE, ckpt, 4, W, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"restored step {restored}" in done.stderr
    read.append(done.stdout)

    got = batches("".join(read))
    assert got == expected
    assert harness.final(done.stdout)[:2] == harness.final(reference.stdout)[:2]



def test_a_sigterm_to_the_whole_process_group_with_data_workers_is_a_preemption(tmp_path):
    # slurmstepd signals every process of the step, the DataLoader workers
    # too; a worker that died of it would fail the step being checkpointed
    proc = harness.launch(PIPELINE, tmp_path, 2, W, "--data", "loader", "--workers", "2",
                          *ARGS, "--step-sleep", "0.3", new_session=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1]) >= 2:
            break
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == contract.REQUEUE_EXIT_CODE, err[-3000:]
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    (run,) = read_history(tmp_path)
    assert run.stop is StopReason.PREEMPTED and run.checkpoint_written
