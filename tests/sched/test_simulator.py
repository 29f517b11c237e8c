"""The simulator: small traces written here, through every scheduler."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_singularity import paths
from slurm_singularity.sched import planner
from slurm_singularity.sched.sim.run import SimSpec, simulate, write_outputs
from slurm_singularity.sched.sim.policies import reference_policy

PHILLY = Path("/work/shared/traces/philly.csv")
POLICY = reference_policy()


def philly(tmp: Path, rows: list[tuple[str, float, int, str]], name: str = "t.csv") -> Path:
    path = tmp / name
    lines = ["timestamp,duration,num_gpus,gpu_time,cluster"]
    lines += [f"{ts},{d},{g},{d * g},{c}" for ts, d, g, c in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(trace: Path, scheduler: str, gpus: int = 8, rule: str = "size:1/4", **kw):
    spec = SimSpec(trace, scheduler, gpus, POLICY, tier_rule=rule, **kw)
    return simulate(spec)


# a basic 8-GPU job fills the cluster; a premium 1-GPU job arrives 100 s later
PREEMPTION = [("2017-10-01 00:00:00", 1000.0, 8, "teamA"),
              ("2017-10-01 00:01:40", 100.0, 1, "teamB")]


def test_a_premium_arrival_costs_the_no_ckpt_bound_lost_work_and_slurm_or_the_planner_none(
        tmp_path):
    trace = philly(tmp_path, PREEMPTION)
    _, bound = run(trace, "slurm-no-ckpt")
    _, slurm = run(trace, "slurm")
    _, sing = run(trace, "singularity")
    assert bound["lost_gpu_hours"] == pytest.approx(8 * 100 / 3600)
    assert slurm["lost_gpu_hours"] == 0 and slurm["preemptions"] == 1   # grace checkpoint
    assert sing["lost_gpu_hours"] == 0 and sing["preemptions"] == 0
    assert sing["resizes"] >= 1                     # shrunk, not preempted
    assert sing["sla_attainment"]["premium"] == 1.0
    assert sing["avg_jct_s"] < bound["avg_jct_s"]


def test_tiresias_preempts_with_a_checkpoint_and_loses_nothing(tmp_path):
    rows = [("2017-10-01 00:00:00", 90000.0, 8, "a"), ("2017-10-01 05:00:00", 60.0, 8, "b")]
    _, s = run(philly(tmp_path, rows), "tiresias")
    assert s["preemptions"] == 1 and s["lost_gpu_hours"] == 0
    assert s["jobs"] == 2


def test_every_scheduler_finishes_every_job_and_reports_the_summary_fields(tmp_path):
    rows = [(f"2017-10-01 00:{m:02d}:00", 300.0 + 50 * m, 1 + (m % 4 == 0) * 3, f"c{m % 3}")
            for m in range(40)]
    trace = philly(tmp_path, rows)
    for name in ("singularity", "slurm", "slurm-no-ckpt", "slurm-periodic:600", "tiresias",
                 "tiresias:4", "las-tiers"):
        engine, s = run(trace, name, gpus=6, rule="random:20/30/50")
        assert s["jobs"] == 40
        for key in ("avg_jct_s", "p50_jct_s", "p99_jct_s", "avg_queue_s", "utilization",
                    "lost_gpu_hours", "preemptions", "resizes", "sla_attainment", "jct_by_tier",
                    "jain_fairness", "wall_s"):
            assert key in s, (name, key)
        assert 0 < s["utilization"] <= 1
        assert min(j.end - j.submit for j in engine.done) >= 300.0
        assert engine.samples[-1][0] == max(j.end for j in engine.done)   # plots end there


def test_the_simulator_decides_with_the_planner_function_itself(tmp_path, monkeypatch):
    rows = [(f"2017-10-01 00:{m:02d}:00", 200.0 * (1 + m % 5), (1, 2, 4, 8)[m % 4], f"c{m % 2}")
            for m in range(30)]
    trace = philly(tmp_path, rows)
    seen = []
    real = planner.plan
    monkeypatch.setattr(planner, "plan", lambda state, policy, **kw: seen.append(1) or real(state, policy, **kw))
    log = []
    spec = SimSpec(trace, "singularity", 8, POLICY, tier_rule="random:20/30/50")
    simulate(spec, record=lambda state, actions: log.append((state, actions)))
    assert log and len(seen) == len(log)
    assert any(actions for _, actions in log)
    for state, actions in log:
        assert real(state, POLICY) == actions


def test_outputs_are_written_with_plots_and_a_side_by_side_report(tmp_path):
    trace = philly(tmp_path, PREEMPTION)
    dirs = []
    for name in ("slurm", "singularity"):
        engine, s = run(trace, name)
        out = tmp_path / name
        write_outputs(out, engine, s, tuple(dirs))
        dirs.append(out)
    files = sorted(p.name for p in dirs[1].iterdir())
    assert files == ["account_share.png", "jct_cdf.png", "queue.png", "report.md",
                     "summary.json", "utilization.png"]
    report = (dirs[1] / "report.md").read_text()
    assert "| metric | singularity | slurm |" in report and "size:1/4" in report
    assert json.loads((dirs[1] / "summary.json").read_text())["scheduler"] == "singularity"


def test_a_2000_line_head_of_the_philly_trace_runs_through_the_planner(tmp_path):
    if not PHILLY.exists():
        pytest.skip(f"{PHILLY} is not on this machine")
    head = tmp_path / "head.csv"
    with open(PHILLY) as f:
        head.write_text("".join(line for _, line in zip(range(2001), f)))
    engine, s = run(head, "singularity", gpus=256, rule="random:20/30/50")
    assert s["jobs"] == 2000 and s["lost_gpu_hours"] == 0
    # the measured costs (a pass every 2 s, a victim's checkpoint and
    # hand-over) are seconds: they can cost a job of a minute its 95%, never
    # a premium job of an hour or more
    long_premium = [j for j in engine.done if j.tier.value == "premium" and j.work_total >= 3600]
    assert long_premium
    assert all(j.work_total / (j.end - j.submit) >= 0.95 for j in long_premium)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slurm_singularity.cli.admin", "simulate",
                           "--no-progress", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("body, message", [
    ("timestamp,duration,num_gpus,cluster\n2017-10-01 00:00:00,5,1,a\n", "missing column(s) gpu_time"),
    ("timestamp,duration,num_gpus,gpu_time,cluster\n2017-10-01 00:00:00,-5,1,5,a\n",
     ":2: column duration: must be a number in [0, "),
    ("timestamp,duration,num_gpus,gpu_time,cluster\n2017-10-01 00:00:00,5,1,5,a\n"
     "2017-10-01 00:00:09,five,1,5,a\n", ":3: column duration: not a number: 'five'"),
])
def test_a_bad_trace_is_refused_naming_the_line_and_nothing_is_written(tmp_path, body, message):
    trace = tmp_path / "bad.csv"
    trace.write_text(body)
    out = tmp_path / "out"
    r = cli("--trace", str(trace), "--scheduler", "slurm", "--gpus", "8", "--out", str(out))
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_an_unknown_format_and_an_invalid_policy_are_refused(tmp_path):
    trace = philly(tmp_path, PREEMPTION)
    r = cli("--trace", str(trace), "--format", "borg", "--scheduler", "slurm", "--gpus", "8",
            "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "--format" in r.stderr
    bad = tmp_path / "policy.toml"
    bad.write_text((paths.TEMPLATES_DIR / "policy.toml").read_text().replace(
        "gpu_fraction = 0.95", "gpu_fraction = 1.5"))
    r = cli("--trace", str(trace), "--policy", str(bad), "--scheduler", "slurm", "--gpus", "8",
            "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "tiers.premium.gpu_fraction" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


PHILLY_HEAD = "timestamp,duration,num_gpus,gpu_time,cluster\n"
ALIBABA_HEAD = ("name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,"
                "deletion_time,scheduled_time\n")
NOT_UTF8 = (PHILLY_HEAD.encode() + b"2017-10-01 00:00:00,10,1,10,a\n"
            b"2017-10-01 00:00:00,10,1,10,caf\xe9\n")


@pytest.mark.parametrize("fmt, body, options, message", [
    ("philly", PHILLY_HEAD.encode() + b"2017-10-01 00:00:00,10,1e18,10,a\n", (),
     "bad.csv:2: column num_gpus: must be a whole number in [1, 100000], got '1e18'"),
    ("philly", PHILLY_HEAD.encode() + b"2017-10-01 00:00:00,1e300,1,10,a\n", (),
     "bad.csv:2: column duration: must be a number in [0, "),
    ("philly", NOT_UTF8, (),
     f"bad.csv:3: not UTF-8: byte 0xe9 at byte offset {NOT_UTF8.index(bytes([0xe9]))} of the file"),
    ("philly", PHILLY_HEAD.encode() + b"1990-01-01 00:00:00,10,1,10,a\n"
     b"2030-01-01 00:00:00,10,1,10,a\n", (),
     "bad.csv:3: submitted"),
    ("alibaba-v2023", ALIBABA_HEAD.encode() + b"p,1,1,1e18,1000,,LS,Succeeded,0,5,1\n", (),
     "bad.csv:2: column num_gpu: must be a whole number in [0, 100000]"),
    ("alibaba-v2023", ALIBABA_HEAD.encode() + b"p,1,1,1,1000,,LS,Succeeded,0,1e300,1\n", (),
     "bad.csv:2: column deletion_time: must be a number in [-1e+11, 1e+11]"),
    ("philly", PHILLY_HEAD.encode() + b"2017-10-01 00:00:00,10,1,10,a\n",
     ("--gpus", "1000000000000000000", "--gpus-per-node", "1"),
     "--gpus: must be a whole number in [1, 100000]"),
    ("philly", PHILLY_HEAD.encode() + b"2017-10-01 00:00:00,10,1,10,a\n",
     ("--gpus-per-node", "99999999999"), "--gpus-per-node: must be a whole number in [1, 128]"),
    ("philly", PHILLY_HEAD.encode() + b"2017-10-01 00:00:00,10,1,10,a\n",
     ("--tiers", "random:nan/1/1"), "--tiers 'random:nan/1/1'"),
])
def test_an_absurd_number_in_a_trace_or_an_option_is_refused_at_once_not_a_hang(
        tmp_path, fmt, body, options, message):
    trace = tmp_path / "bad.csv"
    trace.write_bytes(body)
    out = tmp_path / "out"
    args = ["--trace", str(trace), "--format", fmt, "--scheduler", "singularity",
            "--out", str(out), *options]
    if "--gpus" not in options:
        args += ["--gpus", "8"]
    r = subprocess.run([sys.executable, "-m", "slurm_singularity.cli.admin", "simulate",
                        "--no-progress", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_a_long_idle_stretch_between_jobs_costs_two_samples_not_one_an_hour(tmp_path):
    rows = [("2017-10-01 00:00:00", 100.0, 1, "a"), ("2026-10-01 00:00:00", 100.0, 1, "a")]
    engine, s = run(philly(tmp_path, rows), "singularity")
    assert s["jobs"] == 2
    assert len(engine.samples) < 10
    assert engine.samples[-1][0] == max(j.end for j in engine.done)


@pytest.mark.parametrize("content, message", [
    (b"{}", "summary.json: scheduler: missing or not a str"),
    (b"\xff{", "summary.json: not a readable summary"),
    (b"[1, 2]", "summary.json: not a summary (a JSON object)"),
])
def test_a_broken_summary_to_compare_with_is_refused_naming_it(tmp_path, content, message):
    trace = philly(tmp_path, PREEMPTION)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "summary.json").write_bytes(content)
    r = cli("--trace", str(trace), "--scheduler", "slurm", "--gpus", "8",
            "--out", str(tmp_path / "o"), "--compare", str(earlier))
    assert r.returncode == 2, r.stderr
    assert f"--compare: {earlier}/{message}" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name, message", [
    ("fifo", "--scheduler: unknown 'fifo' (expected one of singularity, slurm,"),
    ("slurm-periodic:soon", "--scheduler 'slurm-periodic:soon': 'soon' must be a number in (0, 1e9]"),
    ("slurm-periodic:nan", "'nan' must be a number in (0, 1e9]"),
    ("tiresias:-1", "'-1' must be a number in (0, 1e9]"),
    ("slurm-periodic:", "--scheduler: unknown 'slurm-periodic:'"),
    ("singularity:nope", "ABLATION one of rigid, no-hysteresis, no-fair-share"),
])
def test_an_unknown_scheduler_or_a_bad_parameter_is_refused_naming_the_option(tmp_path, name,
                                                                              message):
    r = cli("--trace", str(philly(tmp_path, PREEMPTION)), "--scheduler", name, "--gpus", "8",
            "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_a_report_beside_the_no_ckpt_bound_says_it_is_a_bound(tmp_path):
    trace = philly(tmp_path, PREEMPTION)
    engine, bound = run(trace, "slurm-no-ckpt")
    write_outputs(tmp_path / "bound", engine, bound, ())
    engine, sing = run(trace, "singularity")
    write_outputs(tmp_path / "sing", engine, sing, (tmp_path / "bound",))
    report = (tmp_path / "sing" / "report.md").read_text()
    assert "| metric | singularity | slurm-no-ckpt (a bound) |" in report
    assert "restarts preempted jobs from zero: a bound" in report
