"""Invariants 2 and 3: a checkpoint is never half-written, a damaged one is
refused with a clear message and the previous one used, and a W=8 job's
checkpoint holds one replica's state, not eight."""

from __future__ import annotations

import importlib.util
import os
import signal

import pytest
import torch

from slurm_singularity.runtime import checkpoint
from slurm_singularity.runtime.api import (
    CheckpointError, CheckpointReason, CorruptCheckpointError, StopReason,
)
from slurm_singularity.runtime.history import read_history

import runtime_harness as harness
from conftest import LM_STEPS
from waiting import wait_until


def test_kill_9_of_the_writer_mid_checkpoint_keeps_the_previous_one_and_resumes_from_it(
        tmp_path, lm_reference):
    proc = harness.launch(harness.LM, tmp_path, 2, 8, "--steps", str(LM_STEPS),
                          "--ckpt-every", "3", env={"SINGULARITY_CKPT_DELAY_S": "1.5"})
    try:
        tmp = wait_until(lambda: list(tmp_path.glob(".ckpt-00000006.pt.tmp.*")), 120,
                         "checkpoint 6 being written", every=0.02)[0]
        assert (tmp_path / "ckpt-00000003.pt").exists()
        os.kill(int(tmp.name.rsplit(".", 1)[1]), signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGKILL, err[-2000:]
    assert not (tmp_path / "ckpt-00000006.pt").exists()

    done = harness.run(harness.LM, tmp_path, 4, 8, "--steps", str(LM_STEPS))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "restored step 3" in done.stderr
    assert "half-written checkpoint" in done.stderr
    assert harness.final(done.stdout)[:2] == lm_reference
    assert not list(tmp_path.glob(".ckpt-*tmp*"))
    failed, finished = read_history(tmp_path)
    assert failed.stop is StopReason.FAILED and failed.exit_code == 137
    assert failed.last_step >= 6 and not failed.checkpoint_written
    assert failed.steps_lost == failed.last_step - 3
    assert finished.stop is StopReason.FINISHED and finished.first_step == 3


def test_a_bit_flipped_newest_checkpoint_is_refused_and_the_previous_one_used(
        tmp_path, lm_reference):
    done = harness.run(harness.LM, tmp_path, 2, 8, "--steps", str(LM_STEPS), "--ckpt-every", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [s for s, _ in checkpoint.list_checkpoints(tmp_path)]
    assert steps == [LM_STEPS, 6]          # the last two are kept
    newest = tmp_path / checkpoint.ckpt_name(LM_STEPS)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x10
    newest.write_bytes(bytes(data))

    again = harness.run(harness.LM, tmp_path, 1, 8, "--steps", str(LM_STEPS))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "fails its checksum" in again.stderr and "refusing it" in again.stderr
    assert "restored step 6" in again.stderr
    assert harness.final(again.stdout)[:2] == lm_reference


def _state(step: int) -> dict:
    return {"step": step, "weights": torch.arange(1000, dtype=torch.float32) * step}


def _write(ckpt_dir, step: int) -> None:
    checkpoint.write(ckpt_dir, step, _state(step), devices=1, world_size=8,
                     reason=CheckpointReason.PERIODIC)


def test_a_truncated_checkpoint_is_refused_with_a_message_naming_it(tmp_path, caplog):
    _write(tmp_path, 1)
    _write(tmp_path, 2)
    path = tmp_path / checkpoint.ckpt_name(2)
    path.write_bytes(path.read_bytes()[:-100])
    step, state = checkpoint.load_latest(tmp_path)
    assert step == 1 and torch.equal(state["weights"], _state(1)["weights"])
    assert "ckpt-00000002.pt is truncated" in caplog.text


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(CorruptCheckpointError, match="bad header"):
        checkpoint.deserialize(b"not a checkpoint at all", "x.pt")


def test_when_every_checkpoint_is_damaged_the_runtime_refuses_to_start_from_scratch(tmp_path):
    _write(tmp_path, 1)
    path = tmp_path / checkpoint.ckpt_name(1)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        checkpoint.load_latest(tmp_path)


def test_checkpoint_metadata_describes_each_kept_checkpoint(tmp_path):
    for step in (1, 2, 3):
        _write(tmp_path, step)
    metas = checkpoint.list_meta(tmp_path)
    assert [m.step for m in metas] == [3, 2]
    assert all(m.world_size == 8 and m.reason is CheckpointReason.PERIODIC for m in metas)
    assert metas[0].bytes == (tmp_path / checkpoint.ckpt_name(3)).stat().st_size


def _load_example():
    spec = importlib.util.spec_from_file_location("train_lm", harness.LM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_w8_checkpoint_is_the_size_of_one_replica_not_eight(lm_reference, lm_reference_dir):
    lm = _load_example()
    model, _, _ = lm.build(lm.parse([]), torch.device("cpu"))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    replica = 3 * params                  # parameters + AdamW's two moments
    size = (lm_reference_dir / checkpoint.ckpt_name(LM_STEPS)).stat().st_size
    # beyond the replica: per logical rank its RNG states (torch's 5 KB,
    # Python's and numpy's 2.5 KB each) and a data cursor, plus the file
    # format's framing; eight replicas would be 8x
    rng_states = 9 * (torch.get_rng_state().numel() + 2 * 625 * 4)
    assert replica <= size <= replica + rng_states + 0.1 * replica, (size, replica)
    assert size < 2 * replica
