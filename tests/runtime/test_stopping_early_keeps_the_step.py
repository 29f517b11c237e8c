"""Stopping early (issue 17 item 5): ``trainer.stop()`` and a ``break``
out of ``trainer.steps()`` apply the step under way, write a final
checkpoint and record the run as ``stopped``, never ``finished``; a break
in the middle of ``step.batches()``, which cannot apply its step, says so
and loses nothing silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from slurm_singularity.runtime import checkpoint
from slurm_singularity.runtime.api import CheckpointReason, StopReason
from slurm_singularity.runtime.history import read_history

import runtime_harness as harness

SCRIPT = str(Path(__file__).with_name("stopping_script.py"))


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory) -> str:
    """params sha256 after 4 uninterrupted steps (W=4, D=1)."""
    done = harness.run(SCRIPT, tmp_path_factory.mktemp("four"), 1, 4, "--steps", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    return harness.final(done.stdout)[1]


@pytest.mark.parametrize("how", ["stop", "break"])
def test_stopping_at_a_step_applies_it_checkpoints_it_and_records_stopped(tmp_path, how,
                                                                          four_steps):
    # stop() is called on device 0 only: the devices agree; a break is taken on both
    done = harness.run(SCRIPT, tmp_path, 2, 4, "--steps", "6", "--at", "3", "--how", how)
    assert done.returncode == 0, done.stderr[-3000:]
    step, params, _ = harness.final(done.stdout)
    assert (step, params) == (4, four_steps)
    newest = checkpoint.list_meta(tmp_path)[0]
    assert (newest.step, newest.reason) == (4, CheckpointReason.FINAL)
    (run,) = read_history(tmp_path)
    assert run.stop is StopReason.STOPPED and run.last_step == 4
    assert run.checkpoint_written and run.steps_lost == 0 and run.exit_code == 0

    resumed = harness.run(SCRIPT, tmp_path, 1, 4, "--steps", "4")
    assert resumed.returncode == 0 and "restored step 4" in resumed.stderr
    assert harness.final(resumed.stdout)[:2] == (4, four_steps)


def test_a_break_inside_the_batches_of_a_step_says_that_step_is_not_kept(tmp_path):
    done = harness.run(SCRIPT, tmp_path, 2, 4, "--steps", "6", "--at", "3",
                       "--how", "break-inner")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the loop left step 3 in the middle of the pass" in done.stderr
    assert "cannot be applied or checkpointed" in done.stderr
    (run,) = read_history(tmp_path)
    assert run.stop is StopReason.STOPPED and run.last_step == 3
    assert run.steps_lost == 3 and not run.checkpoint_written
