"""One live policy: ``policy apply`` installs the policy beside the files
it renders from it, with its sha256 in them, and the daemon's systemd unit;
the daemon refuses a policy that is not the one Slurm enforces, naming both
files; a broken policy changes nothing. Real files in a temporary Slurm
configuration directory, real processes; no controller needed
(``--no-reconfigure``)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_singularity.policy import default_policy_path

SLURM_CONF = """ClusterName=t
NodeName=n[1-2] Gres=gpu:8 CPUs=8
"""


def _run(*argv: str, conf_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, SLURM_CONF=str(conf_dir / "slurm.conf"))
    return subprocess.run([sys.executable, "-m", *argv], env=env, capture_output=True,
                          text=True, timeout=60)


def _apply(policy: Path, conf_dir: Path, units: Path) -> subprocess.CompletedProcess:
    return _run("slurm_singularity.cli.admin", "policy", "apply", str(policy),
                "--no-reconfigure", "--unit-dir", str(units), conf_dir=conf_dir)


def _schedd(conf_dir: Path, *argv: str) -> subprocess.CompletedProcess:
    return _run("slurm_singularity.cli.schedd", "--once", "--dry-run", *argv, conf_dir=conf_dir)


@pytest.fixture
def site(tmp_path):
    """A Slurm configuration directory, a units directory and a policy file."""
    conf_dir = tmp_path / "etc-slurm"
    conf_dir.mkdir()
    (conf_dir / "slurm.conf").write_text(SLURM_CONF)
    units = tmp_path / "units"
    units.mkdir()
    policy = tmp_path / "site-policy.toml"
    policy.write_text(default_policy_path().read_text() + "\n# site copy\n")
    return conf_dir, units, policy


def test_apply_installs_the_policy_with_its_sha256_beside_what_slurm_reads(site):
    conf_dir, units, policy = site
    r = _apply(policy, conf_dir, units)
    assert r.returncode == 0, r.stderr
    digest = hashlib.sha256(policy.read_bytes()).hexdigest()
    assert (conf_dir / "policy.toml").read_bytes() == policy.read_bytes()
    assert f"-- policy-sha256: {digest}\n" in (conf_dir / "job_submit.lua").read_text()
    assert f"# policy-sha256: {digest}\n" in (conf_dir / "policy.conf").read_text()
    assert digest in r.stdout


def test_apply_renders_and_installs_the_daemons_systemd_unit_on_the_installed_policy(site):
    conf_dir, units, policy = site
    assert _apply(policy, conf_dir, units).returncode == 0
    unit = (units / "singularity-schedd.service").read_text()
    assert f"Environment=SLURM_CONF={conf_dir / 'slurm.conf'}\n" in unit
    assert (f"ExecStart={sys.prefix}/bin/singularity-schedd --policy {conf_dir / 'policy.toml'} "
            in unit)
    assert "{{" not in unit


def test_a_broken_policy_leaves_the_installed_files_untouched(site):
    conf_dir, units, policy = site
    assert _apply(policy, conf_dir, units).returncode == 0
    before = {p.name: p.read_bytes() for d in (conf_dir, units) for p in d.iterdir()}
    broken = policy.with_name("broken.toml")
    broken.write_text(policy.read_text().replace("grace_time_s = 30", "grace_time_s = -1", 1))
    r = _apply(broken, conf_dir, units)
    assert r.returncode == 1
    assert "grace_time_s" in r.stderr and "nothing was changed" in r.stderr
    after = {p.name: p.read_bytes() for d in (conf_dir, units) for p in d.iterdir()}
    assert after == before


def test_the_daemon_refuses_a_policy_slurm_does_not_enforce_naming_both_files(site):
    conf_dir, units, policy = site
    assert _apply(policy, conf_dir, units).returncode == 0
    other = policy.with_name("other.toml")
    other.write_text(policy.read_text().replace("gpu_quota = 32", "gpu_quota = 16"))
    r = _schedd(conf_dir, "--policy", str(other))
    assert r.returncode == 2, r.stderr
    assert str(other) in r.stderr and str(conf_dir / "job_submit.lua") in r.stderr, r.stderr
    assert str(conf_dir / "policy.toml") in r.stderr, r.stderr
    assert hashlib.sha256(other.read_bytes()).hexdigest()[:12] in r.stderr
    assert hashlib.sha256(policy.read_bytes()).hexdigest()[:12] in r.stderr


def test_the_daemon_refuses_a_job_submit_lua_that_policy_apply_did_not_write(site):
    conf_dir, units, policy = site
    (conf_dir / "job_submit.lua").write_text("function slurm_job_submit() return 0 end\n")
    r = _schedd(conf_dir, "--policy", str(policy))
    assert r.returncode == 2
    assert "no policy-sha256 line" in r.stderr and "policy apply" in r.stderr, r.stderr


def test_the_daemon_reads_the_installed_policy_by_default(site):
    conf_dir, units, policy = site
    r = _schedd(conf_dir)
    assert r.returncode == 2
    assert str(conf_dir / "policy.toml") in r.stderr, r.stderr
    assert _apply(policy, conf_dir, units).returncode == 0
    (conf_dir / "policy.toml").write_text(policy.read_text() + "# edited in place\n")
    r = _schedd(conf_dir)
    assert r.returncode == 2 and "differs from the policy Slurm enforces" in r.stderr, r.stderr
