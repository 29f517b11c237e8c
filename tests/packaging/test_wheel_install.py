"""The package as a site installs it: a wheel in a clean venv, no checkout.

The wheel is built from a copy of the source (the checkout's own build/ is
left alone), installed into fresh venvs made from the interpreter's base
Python (nothing of the test venv is visible), and the commands are run from
a directory outside the checkout with PYTHONPATH cleared, so that only the
installed package can be imported. Two installs: the controller alone (the
base install: no torch) and the controller with the ``sim`` extra.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from slurm_singularity import paths
from slurm_singularity.cli import extras

SOURCE = paths.REPO_ROOT
SKIP_COPY = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                   ".state", ".pytest_cache", ".hypothesis", "out", "*.so", "*.o")
PIP = ("-m", "pip", "--disable-pip-version-check", "--no-input")


def _run(cmd: list[str], cwd: Path, timeout: float = 300, env: dict | None = None
         ) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in (env or os.environ).items()
             if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return subprocess.run(cmd, cwd=cwd, env=clean, capture_output=True, text=True,
                          timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "slurm-singularity"
    shutil.copytree(SOURCE, src, symlinks=True, ignore=SKIP_COPY)
    out = tmp_path_factory.mktemp("wheel")
    _ok(_run([sys.executable, *PIP, "wheel", "--no-deps", "--no-build-isolation", "-q",
              "-w", str(out), str(src)], cwd=out))
    (found,) = out.glob("slurm_singularity-*.whl")
    return found


def _venv(where: Path, wheel: Path, extra: str = "") -> Path:
    base = Path(getattr(sys, "_base_executable", sys.executable))
    _ok(_run([str(base), "-m", "venv", str(where)], cwd=where.parent))
    _ok(_run([str(where / "bin" / "python"), *PIP, "install", "-q",
              f"{wheel}{extra}"], cwd=where.parent, timeout=600))
    return where / "bin"


@pytest.fixture(scope="module")
def controller(tmp_path_factory, wheel) -> Path:
    """bin/ of a venv with the base install only."""
    return _venv(tmp_path_factory.mktemp("controller") / "venv", wheel)


@pytest.fixture(scope="module")
def with_sim(tmp_path_factory, wheel) -> Path:
    """bin/ of a venv with the base install and the ``sim`` extra."""
    return _venv(tmp_path_factory.mktemp("sim") / "venv", wheel, "[sim]")


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A working directory with no checkout in it or above it."""
    d = tmp_path / "cwd"
    d.mkdir()
    assert not (d / "slurm_singularity").exists()
    return d


def _installed_templates(bin_dir: Path, cwd: Path) -> Path:
    proc = _ok(_run([str(bin_dir / "python"), "-c",
                     "from slurm_singularity import paths; print(paths.TEMPLATES_DIR)"], cwd))
    return Path(proc.stdout.strip())


def test_the_installed_package_finds_its_templates_inside_the_venv_not_the_checkout(
        controller, elsewhere):
    templates = _installed_templates(controller, elsewhere)
    assert templates.is_relative_to(controller.parent), templates
    assert {"policy.toml", "job_submit.lua.j2", "policy.conf.j2",
            "singularity-schedd.service.j2"} <= {p.name for p in templates.iterdir()}


def test_singularity_admin_help_works_from_the_wheel_and_leaves_out_the_test_cluster(
        controller, elsewhere):
    out = _ok(_run([str(controller / "singularity-admin"), "--help"], elsewhere)).stdout
    for command in ("policy", "job", "status", "simulate"):
        assert command in out
    assert "cluster" not in out.split("positional arguments")[1].split("options:")[0]


def test_policy_check_accepts_the_packaged_example_policy(controller, elsewhere):
    policy = _installed_templates(controller, elsewhere) / "policy.toml"
    proc = _ok(_run([str(controller / "singularity-admin"), "policy", "check", str(policy)],
                    elsewhere))
    assert "error" not in (proc.stdout + proc.stderr).lower()


def test_a_controller_install_has_no_torch_but_its_daemon_starts(controller, elsewhere):
    proc = _run([str(controller / "python"), "-c", "import torch"], elsewhere)
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr
    out = _ok(_run([str(controller / "singularity-schedd"), "--help"], elsewhere)).stdout
    assert "--dry-run" in out


def test_simulate_without_the_sim_extra_names_the_extra_in_one_line(controller, elsewhere):
    trace = _tiny_trace(elsewhere)
    proc = _run([str(controller / "singularity-admin"), "simulate", "--trace", str(trace),
                 "--scheduler", "singularity", "--gpus", "8", "--out", str(elsewhere / "o")],
                elsewhere)
    assert proc.returncode == extras.MISSING_EXTRA_EXIT, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "pip install 'slurm-singularity[sim]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_singularity_run_without_the_runtime_extra_names_the_extra(controller, elsewhere):
    script = elsewhere / "train.py"
    script.write_text("print('trained')\n")
    proc = _run([str(controller / "singularity-run"), "--ckpt-dir", str(elsewhere / "ck"),
                 str(script)], elsewhere)
    assert proc.returncode == extras.MISSING_EXTRA_EXIT, proc.stderr
    assert "pip install 'slurm-singularity[runtime]'" in proc.stderr
    assert "missing: torch" in proc.stderr and "Traceback" not in proc.stderr
    assert "trained" not in proc.stdout


def _tiny_trace(where: Path) -> Path:
    trace = where / "tiny.csv"
    trace.write_text("timestamp,duration,num_gpus,gpu_time,cluster\n"
                     "2017-10-01 00:00:00,1000,8,8000,teamA\n"
                     "2017-10-01 00:01:40,100,1,100,teamB\n"
                     "2017-10-01 00:02:00,300,2,600,teamA\n")
    return trace


def test_simulate_with_the_sim_extra_shows_progress_and_writes_its_report(with_sim, elsewhere):
    trace = _tiny_trace(elsewhere)
    out = elsewhere / "out"
    proc = _ok(_run([str(with_sim / "singularity-admin"), "simulate", "--trace", str(trace),
                     "--scheduler", "singularity", "--gpus", "8", "--out", str(out)], elsewhere))
    assert "3/3" in proc.stderr, proc.stderr           # tqdm's bar reached the end
    assert "singularity: 3 jobs" in proc.stdout
    assert (out / "summary.json").is_file() and (out / "report.md").is_file()
    assert list(out.glob("*.png")), sorted(p.name for p in out.iterdir())


def test_every_extra_of_pyproject_brings_the_modules_the_commands_check_for():
    """cli/extras.py's table and pyproject.toml's extras say the same."""
    project = tomllib.loads((SOURCE / "pyproject.toml").read_text())["project"]
    declared = project["optional-dependencies"]
    import_name = {"nvidia-ml-py": "pynvml"}

    def modules(extra: str) -> set[str]:
        out: set[str] = set()
        for req in declared[extra]:
            name = req.split(";")[0].split("[")[0]
            for sep in "=<>!~ ":
                name = name.split(sep)[0]
            if name == "slurm-singularity":     # an extra that includes another
                inner = req.split("[")[1].split("]")[0]
                out |= set().union(*(modules(e) for e in inner.split(",")))
            else:
                out.add(import_name.get(name, name.replace("-", "_")))
        return out

    for extra, wanted in extras.EXTRA_MODULES.items():
        assert set(wanted) == modules(extra), extra
    base = {d.split(">")[0].split("=")[0] for d in project["dependencies"]}
    assert not base & {"torch", "matplotlib", "tqdm", "pynvml", "nvidia-ml-py", "numpy"}
