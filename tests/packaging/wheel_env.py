"""Building the wheel and installing it into clean venvs, for tests/packaging/.

The wheel is built from a copy of the source (the checkout's own build/ is
left alone). A venv is made from the interpreter's base Python, so nothing
of the test venv is visible in it, and commands run with PYTHONPATH cleared,
so only the installed package can be imported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from slurm_singularity import paths

SOURCE = paths.REPO_ROOT
SKIP_COPY = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                   ".state", ".pytest_cache", ".hypothesis", "out", "*.so", "*.o")
PIP = ("-m", "pip", "--disable-pip-version-check", "--no-input")


def run(cmd: list[str], cwd: Path, timeout: float = 300, env: dict | None = None
        ) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``cwd`` with the checkout kept off sys.path."""
    clean = {k: v for k, v in (env or os.environ).items()
             if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return subprocess.run(cmd, cwd=cwd, env=clean, capture_output=True, text=True,
                          timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def build_wheel(workdir: Path) -> Path:
    """The project's wheel, built from a copy of the source under ``workdir``
    in an isolated build environment (a fresh venv's setuptools may be too
    old to build it, as a site's would)."""
    src = workdir / "src"
    shutil.copytree(SOURCE, src, symlinks=True, ignore=SKIP_COPY)
    out = workdir / "dist"
    ok(run([sys.executable, *PIP, "wheel", "--no-deps", "-q",
            "-w", str(out), str(src)], cwd=workdir))
    (found,) = out.glob("slurm_singularity-*.whl")
    return found


def make_venv(where: Path, wheel: Path, extra: str = "") -> Path:
    """A fresh venv at ``where`` with ``wheel[extra]`` installed; its bin/."""
    base = Path(getattr(sys, "_base_executable", sys.executable))
    ok(run([str(base), "-m", "venv", str(where)], cwd=where.parent))
    ok(run([str(where / "bin" / "python"), *PIP, "install", "-q", f"{wheel}{extra}"],
           cwd=where.parent, timeout=600))
    return where / "bin"
