"""examples/train_lm.py under the runtime with W=8 logical ranks, run through
device proxies on D=1 and D=2 devices, ends with the parameters of the
direct run (same params_sha256)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_singularity.proxy.api import stop_proxies
from slurm_singularity.proxy.worker import start_node_proxies

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "train_lm.py"
SHIM = Path(__file__).with_name("runtime_shim.py")
STEPS = "2"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], devices: int, ckpt: Path, extra: dict[str, str]) -> str:
    port = _port()
    procs = []
    for rank in range(devices):
        env = {**os.environ, **extra, "SINGULARITY_WORLD_SIZE": "8",
               "SINGULARITY_DEVICES": str(devices), "SINGULARITY_DEVICE_RANK": str(rank),
               "SINGULARITY_CKPT_DIR": str(ckpt), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(devices)}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=ROOT))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_o, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    final = [line for line in outs[0][0].splitlines() if line.startswith("final ")]
    assert final, outs[0][0]
    return final[-1]


@pytest.mark.skipif(not EXAMPLE.exists(), reason="examples/train_lm.py is not there yet")
def test_w8_through_proxies_on_one_and_two_devices_equals_the_direct_run(tmp_path):
    direct = _run([sys.executable, str(EXAMPLE), "--steps", STEPS], 1, tmp_path / "direct", {})
    for devices in (1, 2):
        handles, env = start_node_proxies(devices, tmp_path / f"state{devices}", f"w8d{devices}")
        try:
            got = _run([sys.executable, str(SHIM), str(EXAMPLE), "--steps", STEPS], devices,
                       tmp_path / f"proxy{devices}", env)
        finally:
            stop_proxies(handles)
        assert got == direct, (devices, got, direct)
