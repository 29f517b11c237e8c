"""Runs examples under singularity-run as a user would: a subprocess, with
signals sent to the launcher."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LM = str(REPO / "examples" / "train_lm.py")
BN = str(REPO / "examples" / "train_bn.py")
RUN = str(Path(sys.executable).parent / "singularity-run")
FINAL = re.compile(r"^final step=(\d+) params_sha256=([0-9a-f]{64})(?: buffers_sha256=([0-9a-f]{64}))?",
                   re.M)


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SINGULARITY_", "SLURM_"))}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def launch(script: str, ckpt: Path, devices: int, world: int, *args: str,
           env: dict[str, str] | None = None,
           new_session: bool = False) -> subprocess.Popen[str]:
    """``new_session``: the launcher leads its own process group, so that a
    test can signal it and its workers at once (``os.killpg``) as slurmstepd
    signals a step's processes."""
    return subprocess.Popen(
        [RUN, "--devices", str(devices), "--world-size", str(world), "--ckpt-dir", str(ckpt),
         script, *args], env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=new_session)


def run(script: str, ckpt: Path, devices: int, world: int, *args: str,
        env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    proc = launch(script, ckpt, devices, world, *args, env=env)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def final(out: str) -> tuple[int, str, str | None]:
    """(step, params hash, buffers hash) from the example's last line."""
    match = FINAL.search(out)
    if not match:
        raise AssertionError(f"no 'final step=' line in output:\n{out[-2000:]}")
    return int(match.group(1)), match.group(2), match.group(3)


def run_and_preempt(script: str, ckpt: Path, devices: int, world: int, stop_at: int, *args: str,
                    sig: int = signal.SIGTERM, timeout: float = 180,
                    repeat_after_s: tuple[float, ...] | list[float] = ()
                    ) -> tuple[int, int, str, str]:
    """Start a run, send ``sig`` to the launcher once worker 0 printed
    ``step n`` with ``n >= stop_at`` (and again after each delay of
    ``repeat_after_s`` while it runs); returns (exit code, n, stdout, stderr)."""
    proc = launch(script, ckpt, devices, world, *args)
    assert proc.stdout is not None
    seen = -1
    lines = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step "):
            seen = int(line.split()[1])
            if seen >= stop_at:
                proc.send_signal(sig)
                break
        if time.monotonic() > deadline:
            proc.kill()
            break
    for delay in repeat_after_s:
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(sig)
    # read the rest through the file objects: ``communicate`` reads the pipes'
    # descriptors and would drop lines the loop above had read ahead
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    err_box: list[str] = []
    reader = threading.Thread(target=lambda: err_box.append(proc.stderr.read()))
    reader.start()
    try:
        out = proc.stdout.read()
        reader.join()
        proc.wait()
    finally:
        watchdog.cancel()
    return proc.returncode, seen, "".join(lines) + out, err_box[0] if err_box else ""
