"""An unmodified gloo DDP script (W=4 ranks by torch.multiprocessing, a
DataLoader with 2 workers each, its own epoch loop, nothing of this project
imported) is dumped mid-run by the keeper and restored by the next run; it
ends with the parameters (sha256) of an uninterrupted run, and no step is
done twice. Slow on a busy machine (several minutes): it runs the script
twice."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

from keeper_harness import start, wait_until
from slurm_singularity import contract

DDP = Path(__file__).parent / "ddp_plain.py"
EPOCHS = 3
FINAL = re.compile(r"final step=(\d+) params_sha256=([0-9a-f]{64})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def steps(path: Path) -> list[int]:
    try:
        return [int(m) for m in re.findall(r"^step (\d+) ", path.read_text(), re.M)]
    except FileNotFoundError:
        return []


def test_an_unmodified_ddp_script_dumped_mid_run_ends_with_the_uninterrupted_parameters(
        criu_ready, work):
    ref = work / "reference.txt"
    subprocess.run([sys.executable, str(DDP), str(free_port()), str(EPOCHS), str(ref)],
                   env={"PATH": "/usr/bin:/bin", "USE_LIBUV": "0"}, check=True, timeout=900)
    want = FINAL.search(ref.read_text())
    assert want, ref.read_text()

    out = work / "train.txt"
    script = work / "ddp.sh"
    script.write_text(f"#!/bin/bash\nexec {sys.executable} {DDP} {free_port()} {EPOCHS} {out}\n")
    script.chmod(0o755)
    ckpt = work / "ckpt"
    first = start(work, script, job_id=201, ckpt=ckpt, tag="run0")
    wait_until(lambda: len(steps(out)) >= 10, 600, "step 10", every=0.5)
    assert first.preempt(timeout=600) == contract.REQUEUE_EXIT_CODE, first.stderr()
    second = start(work, script, job_id=201, ckpt=ckpt, tag="run1")
    assert second.proc.wait(timeout=900) == 0, second.stderr()
    assert "restored in" in second.stderr()
    got = FINAL.search(out.read_text())
    assert got and got.group(1) == want.group(1), out.read_text()[-500:]
    assert got.group(2) == want.group(2), "the restored run differs from the uninterrupted one"
    assert steps(out) == list(range(1, int(want.group(1)) + 1))
