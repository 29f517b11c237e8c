"""A full checkpoint file system (a real 4 MiB tmpfs, mounted here as root)
must not turn a reported failure into a traceback: the failed checkpoint is
reported, the previous checkpoint is kept, the run is recorded in
history.jsonl where there is room for the line and, where there is none,
``singularity-run`` says so once on stderr and still exits with the run's
code; after space is freed the job resumes to the uninterrupted result."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from slurm_singularity.runtime import checkpoint
from slurm_singularity.runtime.api import StopReason
from slurm_singularity.runtime.history import HISTORY_NAME, read_history

import runtime_harness as harness
from conftest import LM_ARGS


@pytest.fixture
def small_fs(tmp_path: Path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(directory: Path) -> Path:
    """Write zeros until the file system is full; returns the filler."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(chunk)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    fd = os.open(filler, os.O_WRONLY | os.O_APPEND)   # the last partial page too
    try:
        while True:
            os.write(fd, b"\0")
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def test_a_full_file_system_fails_the_run_with_its_code_and_no_traceback(
        small_fs, lm_reference):
    ckpt = small_fs / "ckpt"
    code, _, _, err = harness.run_and_preempt(harness.LM, ckpt, 2, 8, 2, *LM_ARGS)
    assert code == 75, err[-3000:]
    kept = checkpoint.list_meta(ckpt)[0]
    filler = _fill(small_fs)

    # room for the history line in history.jsonl's last page: recorded
    done = harness.run(harness.LM, ckpt, 2, 8, *LM_ARGS)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "cannot write checkpoint" in done.stderr and "No space left" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    runs = read_history(ckpt)
    assert [r.stop for r in runs] == [StopReason.PREEMPTED, StopReason.FAILED]
    assert runs[-1].exit_code == 2

    # no room for history.jsonl at all: said once, same exit code
    (ckpt / HISTORY_NAME).unlink()
    _fill(small_fs)
    done = harness.run(harness.LM, ckpt, 2, 8, *LM_ARGS)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.count("could not record this run") == 1, done.stderr[-3000:]
    assert checkpoint.list_meta(ckpt)[0].step == kept.step     # the previous one is kept

    filler.unlink()
    done = harness.run(harness.LM, ckpt, 2, 8, *LM_ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"restored step {kept.step}" in done.stderr
    assert harness.final(done.stdout)[:2] == lm_reference
