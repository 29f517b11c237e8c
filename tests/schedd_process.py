"""singularity-schedd as a subprocess of a test, on the test cluster, stopped
by its pid: shared by the daemon's cluster tests and the security tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


class Schedd:
    """singularity-schedd as a subprocess, stopped by its pid."""

    def __init__(self, cluster, log_path: Path, args: tuple[str, ...] = ()) -> None:
        self.cluster = cluster
        self.log_path = log_path
        self.args = args
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slurm_singularity.cli.schedd", "--period", "0.5",
             "--gpus-per-node", "8", "--journal", str(self.log_path.with_suffix(".journal")),
             *self.args], env=self.cluster.env, stdout=self.log, stderr=self.log)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def text(self) -> str:
        return self.log_path.read_text()
