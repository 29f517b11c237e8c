"""`make demo`'s transparent scene, run alone against the test cluster: a
plain Python counter submitted with --transparent is preempted by a premium
job, restored, and its output continues without a gap or a repeat; the
scene says so ("continuous: yes") and shows the job in status and job show."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]


def test_the_transparent_scene_prints_a_continuous_count(slurm_cluster, criu_ready):
    state = Path(tempfile.mkdtemp(prefix="singularity-demo-test-"))
    t0 = time.monotonic()
    try:
        r = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--state-dir",
                            str(state), "--scenes", "transparent"], env=slurm_cluster.env,
                           capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    took = time.monotonic() - t0
    print(r.stdout, r.stderr, f"scene took {took:.1f} s", sep="\n")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "continuous: yes" in r.stdout, r.stdout[-3000:]
    assert "COMPLETED after 1 requeue(s)" in r.stdout, r.stdout[-3000:]
    assert " transparent " in r.stdout            # status's MODE column
    assert "transparent (CRIU), 2 run(s)" in r.stdout    # job show
    dumped = r.stdout.split("dumped on ", 1)[1].split()[0]
    restored = r.stdout.split("restored on ", 1)[1].split(";")[0]
    assert dumped != restored, r.stdout[-3000:]
    assert "steps lost in all: unknown" not in r.stdout
    assert took < 120, f"the scene took {took:.0f} s"
