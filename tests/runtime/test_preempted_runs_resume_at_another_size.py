"""Invariants 1 and 2 across preemptions: a run stopped by the preemption
signal at random steps and restarted on a different number of devices each
time ends with the same parameters as an uninterrupted run, loses no
completed step, and leaves one history.jsonl record per run."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

from slurm_singularity import contract
from slurm_singularity.runtime import checkpoint
from slurm_singularity.runtime.api import CheckpointReason, StopReason
from slurm_singularity.runtime.history import read_history

import runtime_harness as harness
from conftest import LM_ARGS, LM_STEPS


def test_preempting_at_random_steps_and_resizing_gives_the_uninterrupted_result(
        tmp_path, lm_reference):
    rng = random.Random(20261126)
    restored = 0
    for devices in (2, 8, 4):
        stop_at = min(restored + rng.randint(1, 2), LM_STEPS - 2)
        code, seen, out, err = harness.run_and_preempt(harness.LM, tmp_path, devices, 8,
                                                       stop_at, *LM_ARGS)
        assert code == contract.REQUEUE_EXIT_CODE, err[-3000:]
        newest = checkpoint.list_meta(tmp_path)[0]
        assert newest.reason is CheckpointReason.PREEMPT
        assert newest.devices == devices and newest.world_size == 8
        # the devices agreed on a boundary within two steps of the signal,
        # and no completed step was lost
        assert seen <= newest.step <= seen + 2, (seen, newest.step)
        assert newest.step > restored
        restored = newest.step
    done = harness.run(harness.LM, tmp_path, 1, 8, *LM_ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"restored step {restored}" in done.stderr
    assert harness.final(done.stdout)[:2] == lm_reference

    runs = read_history(tmp_path)
    assert [r.stop for r in runs] == [StopReason.PREEMPTED] * 3 + [StopReason.FINISHED]
    assert [r.devices for r in runs] == [2, 8, 4, 1]
    assert runs[0].first_step == 0 and runs[-1].last_step == LM_STEPS
    for before, after in zip(runs, runs[1:]):
        assert after.first_step == before.last_step
    # (the last preemption may land on the last step: the final run then
    # restores it, has nothing to do and writes no checkpoint of its own)
    assert all(r.checkpoint_written or r.first_step == LM_STEPS for r in runs), \
        "\n".join(map(str, runs))
    assert all(r.steps_lost == 0 for r in runs), "\n".join(map(str, runs))
    assert runs[0].exit_code == contract.REQUEUE_EXIT_CODE and runs[-1].exit_code == 0


def test_a_preemption_signal_that_comes_while_the_workers_start_is_not_lost(tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = harness.launch(harness.LM, ckpt, 2, 4, *LM_ARGS)
    while not ckpt.exists():      # the launcher is up (its handlers are in place)
        assert proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)   # long before the workers imported torch
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == contract.REQUEUE_EXIT_CODE, err[-3000:]
    (run,) = read_history(ckpt)
    assert run.stop is StopReason.PREEMPTED and run.checkpoint_written
    assert checkpoint.list_meta(ckpt)[0].step == run.last_step


def test_a_worker_that_fails_fails_the_run_and_its_history_says_so(tmp_path):
    script = str(Path(__file__).with_name("crashing_worker.py"))
    done = harness.run(script, tmp_path, 2, 4)
    assert done.returncode == 1
    assert "worker 1 fails on purpose" in done.stderr
    (run,) = read_history(tmp_path)
    assert run.stop is StopReason.FAILED and run.exit_code == 1
    # the exception came after the step's pass: that step was applied on
    # every device and is kept in a checkpoint, not lost
    assert run.last_step == 3 and run.steps_lost == 0
    assert checkpoint.list_meta(tmp_path)[0].step == 3
