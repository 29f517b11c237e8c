"""Invariant 1: in deterministic mode a W=8 job computes the same parameters,
bit for bit, on 1, 2, 4 or 8 devices."""

from __future__ import annotations

import pytest

import runtime_harness as harness
from conftest import LM_STEPS


@pytest.mark.parametrize("devices", [2, 4, 8])
def test_the_language_model_trained_on_d_devices_has_the_same_parameters_as_on_one(
        tmp_path, lm_reference, devices):
    done = harness.run(harness.LM, tmp_path, devices, 8, "--steps", str(LM_STEPS))
    assert done.returncode == 0, done.stderr[-3000:]
    assert harness.final(done.stdout)[:2] == lm_reference


def test_batchnorm_buffers_and_dropout_streams_follow_their_logical_rank(tmp_path):
    results = []
    for devices in (1, 2):
        done = harness.run(harness.BN, tmp_path / f"d{devices}", devices, 4, "--steps", "6",
                           "--buffers", "per_rank")
        assert done.returncode == 0, done.stderr[-3000:]
        results.append(harness.final(done.stdout))
    assert results[0] == results[1]
    assert results[0][2] is not None


def test_without_deterministic_mode_training_still_runs_and_finishes(tmp_path):
    done = harness.run(harness.LM, tmp_path, 2, 4, "--steps", "3",
                       env={"SINGULARITY_DETERMINISTIC": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert harness.final(done.stdout)[0] == 3
