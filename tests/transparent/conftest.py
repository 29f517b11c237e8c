"""Transparent mode needs root (the keeper runs as root, as under slurmstepd)
and a working CRIU >= 4.1 (``make setup``)."""

from __future__ import annotations

import os
import shutil
import tempfile
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from slurm_singularity.transparent import criu  # noqa: E402
from slurm_singularity.transparent.api import SetupError  # noqa: E402


@pytest.fixture(scope="session")
def criu_ready() -> Path:
    if os.geteuid() != 0:
        pytest.skip("transparent mode's keeper runs as root; these tests need root")
    try:
        return criu.find()
    except SetupError as exc:
        pytest.skip(f"no working CRIU: {exc}")


@pytest.fixture
def work():
    """A directory every test user can enter (the job's cwd); pytest's own
    are under root's 0700 /tmp/pytest-of-root."""
    path = Path(tempfile.mkdtemp(prefix="singularity-transparent-test-"))
    os.chmod(path, 0o755)
    yield path
    if not os.environ.get("SINGULARITY_KEEP_TEST_DIRS"):
        shutil.rmtree(path, ignore_errors=True)
