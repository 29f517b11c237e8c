"""A LightningModule trained with `Trainer(strategy=SingularityStrategy())`
under singularity-run (emulated CPU devices, deterministic mode) ends with
bitwise the same parameters on D = 1, 2 and 4 devices for W = 4, and across
a preemption (SIGTERM) resumed at another D; what the strategy does not
support is refused with an error that names it (exit 2)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("pytorch_lightning",
                    reason="pytorch-lightning is not installed: "
                           "pip install 'slurm-singularity[lightning]'")

BIN = Path(sys.executable).parent
SCRIPT = Path(__file__).with_name("lightning_script.py")
FINAL = re.compile(r"final step=(\d+) global_step=(\d+) params_sha256=([0-9a-f]{64})")
STEPS = 12


def run(ckpt: Path, devices: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "singularity-run"), "--devices", str(devices),
                           "--world-size", "4", "--ckpt-dir", str(ckpt), str(SCRIPT), *args],
                          capture_output=True, text=True, timeout=timeout)


def final(r: subprocess.CompletedProcess) -> tuple[int, int, str]:
    m = FINAL.search(r.stdout)
    assert r.returncode == 0 and m, r.stdout[-2000:] + r.stderr[-3000:]
    return int(m.group(1)), int(m.group(2)), m.group(3)


def test_a_lightning_module_gives_the_same_parameters_on_1_2_and_4_devices(tmp_path):
    results = {d: final(run(tmp_path / f"d{d}", d, "--steps", str(STEPS))) for d in (1, 2, 4)}
    assert results[1] == results[2] == results[4], results
    assert results[1][:2] == (STEPS, STEPS)        # trainer.global_step says it too


def test_a_preempted_lightning_run_resumed_at_another_size_ends_as_if_uninterrupted(tmp_path):
    want = final(run(tmp_path / "ref", 2, "--steps", str(STEPS)))[2]
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([str(BIN / "singularity-run"), "--devices", "2", "--world-size", "4",
                             "--ckpt-dir", str(ckpt), str(SCRIPT), "--steps", str(STEPS),
                             "--step-sleep", "0.3"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (ckpt / "progress.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)                               # the first step is done
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, out + err
    assert re.search(r"preempted \(SIGTERM here\); checkpointed step ([1-9]\d*)", err), err
    r = run(ckpt, 4, "--steps", str(STEPS))
    assert "restored step" in r.stderr, r.stderr[-3000:]
    assert final(r)[2] == want


@pytest.mark.parametrize("bad, says", [
    ("two-optimizers", "configure_optimizers returned 2 optimizers; exactly one is supported"),
    ("manual", "manual optimization (automatic_optimization=False) is not supported"),
    ("iterable", "over Stream; a DataLoader over a map-style dataset"),
    ("epoch-scheduler", "interval='epoch'"),
    ("accumulate", "accumulate_grad_batches=2) is not supported"),
    ("no-max-steps", "Trainer(max_steps=-1): give the number of steps"),
])
def test_what_the_strategy_does_not_support_is_refused_by_name(tmp_path, bad, says):
    r = run(tmp_path / "ckpt", 1, "--bad", bad, timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert says in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
