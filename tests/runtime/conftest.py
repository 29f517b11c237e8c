"""Fixtures of the runtime tests: uninterrupted reference runs, computed
once per session and shared by the equivalence and resume tests."""

from __future__ import annotations

import pytest

import runtime_harness as harness

LM_STEPS = 8
LM_ARGS = ("--steps", str(LM_STEPS), "--step-sleep", "0.1")


@pytest.fixture(scope="session")
def lm_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str]:
    """W=8 on one device, no interruption: (final step, params sha256)."""
    ckpt = tmp_path_factory.mktemp("lm-reference")
    done = harness.run(harness.LM, ckpt, 1, 8, "--steps", str(LM_STEPS))
    assert done.returncode == 0, done.stderr[-3000:]
    step, digest, _ = harness.final(done.stdout)
    assert step == LM_STEPS
    return step, digest
