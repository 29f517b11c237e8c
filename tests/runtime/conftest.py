"""Fixtures of the runtime tests: uninterrupted reference runs, computed
once per session and shared by the equivalence and resume tests."""

from __future__ import annotations

from pathlib import Path

import pytest

import runtime_harness as harness

LM_STEPS = 8
LM_ARGS = ("--steps", str(LM_STEPS), "--step-sleep", "0.1")


@pytest.fixture(scope="session")
def lm_reference_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lm-reference")


@pytest.fixture(scope="session")
def lm_reference(lm_reference_dir: Path) -> tuple[int, str]:
    """W=8 on one device, no interruption: (final step, params sha256);
    its checkpoints are in ``lm_reference_dir``."""
    ckpt = lm_reference_dir
    done = harness.run(harness.LM, ckpt, 1, 8, "--steps", str(LM_STEPS))
    assert done.returncode == 0, done.stderr[-3000:]
    step, digest, _ = harness.final(done.stdout)
    assert step == LM_STEPS
    return step, digest
