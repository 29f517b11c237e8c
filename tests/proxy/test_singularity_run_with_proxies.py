"""singularity-run --proxy on starts one device proxy per device, runs the
workers' device work through them, gives the same parameters as without
them, and stops the proxies when the run ends."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from slurm_singularity import paths

BIN = Path(sys.executable).parent
FINAL = re.compile(r"final step=(\d+) params_sha256=([0-9a-f]{64})")


def _run(tmp_path: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "singularity-run"), *extra, "--devices", "2", "--world-size", "8",
         "--ckpt-dir", str(tmp_path / name), str(paths.REPO_ROOT / "examples" / "train_lm.py"),
         "--steps", "4"], capture_output=True, text=True, timeout=300)


def _proxy_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "singularity-proxy|slurm_singularity.cli.proxy"],
                         capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def test_run_with_proxies_equals_the_direct_run_and_leaves_no_proxy(tmp_path):
    before = _proxy_pids()
    direct = _run(tmp_path, "direct", "--proxy", "off")
    proxied = _run(tmp_path, "proxied", "--proxy", "on")
    assert direct.returncode == 0, direct.stderr[-2000:]
    assert proxied.returncode == 0, proxied.stderr[-2000:]
    want, got = FINAL.search(direct.stdout), FINAL.search(proxied.stdout)
    assert want and got and got.group(2) == want.group(2)
    assert _proxy_pids() - before == set(), "a device proxy outlived singularity-run"
