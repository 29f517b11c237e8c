"""Fixtures of tests/packaging/: the wheel and venvs with it installed, made
once per session (wheel_env.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import wheel_env


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    return wheel_env.build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def controller(tmp_path_factory, wheel) -> Path:
    """bin/ of a venv with the base install only (no torch)."""
    return wheel_env.make_venv(tmp_path_factory.mktemp("controller") / "venv", wheel)


@pytest.fixture(scope="session")
def with_sim(tmp_path_factory, wheel) -> Path:
    """bin/ of a venv with the base install and the ``sim`` extra."""
    return wheel_env.make_venv(tmp_path_factory.mktemp("sim") / "venv", wheel, "[sim]")


@pytest.fixture(scope="session")
def with_runtime(tmp_path_factory, wheel) -> Path:
    """bin/ of a venv with the ``proxy`` extra (the runtime, torch, nvidia-ml-py)."""
    return wheel_env.make_venv(tmp_path_factory.mktemp("runtime") / "venv", wheel, "[proxy]")


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A working directory with no checkout in it or above it."""
    d = tmp_path / "cwd"
    d.mkdir()
    assert not (d / "slurm_singularity").exists()
    return d
