"""The package as a site installs it: a wheel in a clean venv, no checkout
(wheel_env.py), its commands run from a directory outside the checkout.
Two installs: the controller alone (the base install: no torch) and the
controller with the ``sim`` extra. The checks that need the test cluster
are in test_wheel_on_the_cluster.py."""

from __future__ import annotations

import tomllib
from pathlib import Path

from slurm_singularity.cli import extras

from wheel_env import SOURCE, ok, run


def _installed_templates(bin_dir: Path, cwd: Path) -> Path:
    proc = ok(run([str(bin_dir / "python"), "-c",
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
    out = ok(run([str(controller / "singularity-admin"), "--help"], elsewhere)).stdout
    for command in ("policy", "job", "status", "simulate"):
        assert command in out
    assert "cluster" not in out.split("positional arguments")[1].split("options:")[0]


def test_policy_check_accepts_the_packaged_example_policy(controller, elsewhere):
    policy = _installed_templates(controller, elsewhere) / "policy.toml"
    proc = ok(run([str(controller / "singularity-admin"), "policy", "check", str(policy)],
                    elsewhere))
    assert "error" not in (proc.stdout + proc.stderr).lower()


def test_policy_apply_renders_job_submit_lua_from_the_packaged_templates(controller, elsewhere):
    policy = _installed_templates(controller, elsewhere) / "policy.toml"
    conf = elsewhere / "etc"
    conf.mkdir()
    ok(run([str(controller / "singularity-admin"), "policy", "apply", str(policy),
            "--conf-dir", str(conf), "--nodes", "n[1-4]", "--no-reconfigure"], elsewhere))
    assert "function slurm_job_submit" in (conf / "job_submit.lua").read_text()
    assert "PartitionName=" in (conf / "policy.conf").read_text()


def test_a_controller_install_has_no_torch_but_its_daemon_starts(controller, elsewhere):
    proc = run([str(controller / "python"), "-c", "import torch"], elsewhere)
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr
    out = ok(run([str(controller / "singularity-schedd"), "--help"], elsewhere)).stdout
    assert "--dry-run" in out


def test_simulate_without_the_sim_extra_names_the_extra_in_one_line(controller, elsewhere):
    trace = _tiny_trace(elsewhere)
    proc = run([str(controller / "singularity-admin"), "simulate", "--trace", str(trace),
                 "--scheduler", "singularity", "--gpus", "8", "--out", str(elsewhere / "o")],
                elsewhere)
    assert proc.returncode == extras.MISSING_EXTRA_EXIT, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "pip install 'slurm-singularity[sim]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_singularity_run_without_the_runtime_extra_names_the_extra(controller, elsewhere):
    script = elsewhere / "train.py"
    script.write_text("print('trained')\n")
    proc = run([str(controller / "singularity-run"), "--ckpt-dir", str(elsewhere / "ck"),
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
    proc = ok(run([str(with_sim / "singularity-admin"), "simulate", "--trace", str(trace),
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
