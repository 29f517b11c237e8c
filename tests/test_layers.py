"""The import layers of DESIGN.md hold: ``lint-imports`` (import-linter,
from the ``[test]`` extra) checks the contract in pyproject.toml, and the
contract is not vacuous: a copy of the package with one import against the
layers (policy importing the scheduler) breaks it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_singularity import paths

ROOT = paths.REPO_ROOT


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """lint-imports on the package in ``cwd`` (and no other copy of it)."""
    import importlinter
    code = "import sys; from importlinter.cli import lint_imports_command; " \
           "sys.argv = ['lint-imports', '--no-cache']; lint_imports_command()"
    where = Path(importlinter.__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=120,
                          env={"PYTHONPATH": f"{cwd}:{where}", "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module", autouse=True)
def _import_linter():
    try:
        import importlinter  # noqa: F401
    except ImportError:
        pytest.skip("import-linter is not installed: `make setup` installs the [test] extra "
                    "(pip install -e '.[test]')")


def test_the_packages_import_each_other_only_down_the_layers_of_design_md():
    r = _lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 kept, 0 broken" in r.stdout, r.stdout


def test_an_import_against_the_layers_breaks_the_contract(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "slurm_singularity", tmp_path / "slurm_singularity",
                    ignore=shutil.ignore_patterns("__pycache__", "templates"))
    api = tmp_path / "slurm_singularity" / "policy" / "api.py"
    api.write_text(api.read_text() + "\nfrom ..sched import planner  # noqa: E402\n")
    r = _lint_imports(tmp_path)
    assert r.returncode != 0, r.stdout
    assert "slurm_singularity.policy.api -> slurm_singularity.sched.planner" in r.stdout, r.stdout


#: Each subsystem's root error: a caller catches one class, not a tuple.
ROOTS = {
    "policy": "slurm_singularity.policy.api.PolicyError",
    "slurm": "slurm_singularity.slurm.api.SlurmError",
    "sched": "slurm_singularity.sched.api.SchedError",
    "runtime": "slurm_singularity.runtime.api.JobRuntimeError",
    "proxy": "slurm_singularity.proxy.api.ProxyError",
}


def test_every_error_a_subsystem_defines_derives_from_its_one_root():
    import importlib
    import inspect
    import pkgutil

    for package, root_path in ROOTS.items():
        module_name, _, cls = root_path.rpartition(".")
        root = getattr(importlib.import_module(module_name), cls)
        pkg = importlib.import_module(f"slurm_singularity.{package}")
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            module = importlib.import_module(info.name)
            for name, obj in inspect.getmembers(module, inspect.isclass):
                if (obj.__module__ == module.__name__ and issubclass(obj, Exception)
                        and obj.__name__.endswith("Error")):
                    assert issubclass(obj, root), f"{info.name}.{name} is not a {root_path}"
