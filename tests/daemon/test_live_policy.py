"""A running daemon follows ``policy apply``: while the policy it would act
on is not the one Slurm's installed job_submit.lua was generated from, it
acts on nothing and says why once, naming both files; once they agree again
it takes the new policy over without a restart. Real files in a temporary
Slurm configuration directory, the fake Slurm and clock."""

from __future__ import annotations

import logging

from fake_slurm import Clock, FakeJob, FakeSlurm, run_for, tag
from slurm_singularity import paths
from slurm_singularity.policy.install import LivePolicy, install
from slurm_singularity.policy.load import parse_policy
from slurm_singularity.policy.render import render_policy_files
from slurm_singularity.sched.daemon import Daemon, DaemonSettings

BASE = (paths.TEMPLATES_DIR / "policy.toml").read_text().replace(
    'preemption = "slurm"', 'preemption = "daemon"')


def _apply(text: str, conf_dir) -> None:
    """What `policy apply --no-reconfigure` writes."""
    install(render_policy_files(parse_policy(text), "n[1-4]"), conf_dir)


def test_a_daemon_acts_only_on_the_policy_slurm_enforces_and_follows_a_new_one(
        tmp_path, caplog):
    caplog.set_level(logging.INFO)
    conf_dir = tmp_path / "etc-slurm"
    conf_dir.mkdir()
    _apply(BASE, conf_dir)
    live = LivePolicy(conf_dir / "policy.toml", conf_dir)
    slurm = FakeSlurm(Clock())
    slurm.add(FakeJob(1, "basic", tag("basic", 8, 32, 32), 4, 8), running=True)
    slurm.add(FakeJob(2, "premium", tag("premium", 16, 16, 16), 2, 8, account="research"))
    daemon = Daemon(slurm, live.current(), DaemonSettings(period_s=0.5), clock=slurm.clock,
                    live_policy=live.current)

    # an apply half done: job_submit.lua is another policy's, policy.toml not yet
    other = BASE + "\n# edited\n"
    (conf_dir / "job_submit.lua").write_text(
        render_policy_files(parse_policy(other), "n[1-4]")["job_submit.lua"])
    run_for(slurm, 10, daemon=daemon)
    assert slurm.calls == []                                # not a single action
    refusals = [r.getMessage() for r in caplog.records if "not acting" in r.getMessage()]
    assert len(refusals) == 1, refusals
    assert str(conf_dir / "policy.toml") in refusals[0]
    assert str(conf_dir / "job_submit.lua") in refusals[0]

    _apply(other, conf_dir)                                 # the apply completes
    run_for(slurm, 10, daemon=daemon)
    assert daemon.policy.sha256 == parse_policy(other).sha256
    assert slurm.signals_to(1) == ["TERM"]                  # the shrink for premium
    assert any("taken over" in r.getMessage() for r in caplog.records)
