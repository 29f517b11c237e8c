"""Trace readers and the seeded tier rule."""

from __future__ import annotations

import pytest

from slurm_singularity.policy.api import Tier
from slurm_singularity.sched.sim.trace import (MAX_DURATION_S, MAX_GPUS, TraceError, assign_tiers,
                                               describe_rule, elastic_range, read_alibaba,
                                               read_trace)

HEADER = ("name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,"
          "deletion_time,scheduled_time")


def test_alibaba_pods_become_jobs_with_their_qos_as_tier(tmp_path):
    path = tmp_path / "pods.csv"
    path.write_text("\n".join([
        HEADER,
        "p1,1000,100,2,1000,V100,LS,Succeeded,100,700,200",
        "p2,1000,100,1,500,,BE,Succeeded,50,450,60",
        "p3,1000,100,0,0,,BE,Succeeded,50,450,60",          # no GPU: dropped
        "p4,1000,100,1,1000,T4,Burstable,Running,70,,80",  # still running: a service
    ]) + "\n")
    notes: dict = {}
    jobs = read_alibaba(path, notes)
    assert [(j.submit_s, j.duration_s, j.world_size, j.account, j.tier, j.service)
            for j in jobs] == [
        (0.0, 390.0, 1, "any", Tier.BASIC, False), (20.0, 700.0 - 80.0, 1, "T4", Tier.STANDARD, True),
        (50.0, 500.0, 2, "V100", Tier.PREMIUM, False)]
    assert [j.tier for j in assign_tiers(jobs, "trace")] == [Tier.BASIC, Tier.STANDARD,
                                                             Tier.PREMIUM]
    assert notes == {"dropped": {"no GPU (num_gpu 0)": 1}, "rounded_up": 1,
                     "rounded_up_gpu_milli": 500, "services": 1}


@pytest.mark.parametrize("qos, tier", [("Guaranteed", Tier.PREMIUM), ("LS", Tier.PREMIUM),
                                       ("Burstable", Tier.STANDARD), ("BE", Tier.BASIC)])
def test_every_documented_alibaba_qos_is_a_tier(tmp_path, qos, tier):
    path = tmp_path / "pods.csv"
    path.write_text(HEADER + f"\np1,1,1,2,1000,,{qos},Succeeded,1,50,2\n")
    [job] = read_alibaba(path)
    assert job.tier is tier and not job.service


@pytest.mark.parametrize("phase, kept, service, dropped", [
    ("Succeeded", True, False, {}),
    ("Failed", True, False, {}),                       # it held its GPUs too
    ("Running", True, True, {}),
    ("Pending", False, False, {"never scheduled (Pending or no scheduled_time)": 1}),
])
def test_every_documented_alibaba_pod_phase_is_a_job_a_service_or_a_counted_drop(
        tmp_path, phase, kept, service, dropped):
    path = tmp_path / "pods.csv"
    path.write_text(HEADER + f"\nk,1,1,1,1000,,LS,Succeeded,0,10,1\np1,1,1,2,1000,,BE,{phase},1,50,2\n")
    notes: dict = {}
    jobs = read_alibaba(path, notes)
    assert len(jobs) == 1 + kept and notes["dropped"] == dropped
    if kept:
        assert jobs[1].service is service and jobs[1].world_size == 2
        if service:
            assert (jobs[1].min_devices, jobs[1].max_devices) == (2, 2)    # rigid


def test_an_alibaba_pod_with_an_unknown_phase_is_refused_by_line_and_column(tmp_path):
    path = tmp_path / "pods.csv"
    path.write_text(HEADER + "\np1,1,1,1,1000,,LS,Evicted,1,5,2\n")
    with pytest.raises(TraceError, match=r"pods.csv:2: column pod_phase: unknown 'Evicted' "
                                         r"\(expected Succeeded, Failed, Running, Pending\)"):
        read_alibaba(path)


def test_services_hold_gpus_but_are_not_counted_as_jobs(tmp_path):
    from slurm_singularity.sched.sim.policies import reference_policy
    from slurm_singularity.sched.sim.run import SimSpec, simulate
    path = tmp_path / "pods.csv"
    path.write_text(HEADER + "\n" + "\n".join([
        "svc,1,1,4,1000,,LS,Running,0,1000,0",        # a service on 4 of the 8 GPUs
        "a,1,1,8,1000,,Burstable,Succeeded,10,110,10",  # needs all 8: waits for the service
        "b,1,1,1,300,,BE,Succeeded,20,120,20",         # a share of a GPU: rounded up
    ]) + "\n")
    engine, s = simulate(SimSpec(path, "slurm", 8, reference_policy(), fmt="alibaba-v2023"))
    assert s["jobs"] == 2 and s["services"] == 1
    assert s["trace_notes"]["rounded_up"] == 1 and s["trace_notes"]["services"] == 1
    a = next(j for j in engine.done if j.world_size == 8)
    assert a.first_start >= 1000


def test_an_alibaba_pod_with_an_unknown_qos_is_refused_by_line(tmp_path):
    path = tmp_path / "pods.csv"
    path.write_text(HEADER + "\np1,1,1,1,1000,,Gold,Succeeded,1,5,2\n")
    with pytest.raises(TraceError, match=r"pods.csv:2: column qos: unknown 'Gold'"):
        read_alibaba(path)


def test_an_unknown_format_is_refused():
    with pytest.raises(TraceError, match="unknown trace format 'borg'"):
        read_trace("x.csv", "borg")


def test_the_tier_rule_is_seeded_and_close_to_its_shares(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("timestamp,duration,num_gpus,gpu_time,cluster\n" + "".join(
        f"2017-10-01 00:00:{k % 60:02d},10,{(1, 2, 8)[k % 3]},10,c{k % 5}\n" for k in range(3000)))
    jobs = read_trace(path, "philly")
    a = assign_tiers(jobs, "random:20/30/50", seed=7)
    assert a == assign_tiers(jobs, "random:20/30/50", seed=7)
    assert a != assign_tiers(jobs, "random:20/30/50", seed=8)
    share = sum(j.tier is Tier.PREMIUM for j in a) / len(a)
    assert 0.17 < share < 0.23
    by_cluster = assign_tiers(jobs, "cluster:50/0/50", seed=1)
    assert len({(j.account, j.tier) for j in by_cluster}) == 5   # one tier per account
    assert all(j.min_devices == elastic_range(j.world_size)[0] for j in a)
    assert "20/30/50" in describe_rule("random:20/30/50")


def test_elastic_ranges_keep_the_splice_factor_within_eight():
    assert elastic_range(1) == (1, 1)
    assert elastic_range(8) == (1, 8)
    assert elastic_range(128) == (16, 128)


@pytest.mark.parametrize("rule", ["random:1/2", "zipf:1/2/3", "size:x/y", "random:-1/2/3"])
def test_a_malformed_tier_rule_is_refused(rule, tmp_path):
    with pytest.raises(TraceError, match="--tiers"):
        assign_tiers([], rule)


def test_an_alibaba_trace_runs_through_the_planner_with_its_own_tiers(tmp_path):
    from slurm_singularity.sched.sim.policies import reference_policy
    from slurm_singularity.sched.sim.run import SimSpec, simulate
    path = tmp_path / "pods.csv"
    rows = [f"p{k},1000,100,{(1, 2, 4, 8)[k % 4]},1000,{'V100' if k % 2 else ''},"
            f"{('LS', 'Burstable', 'BE')[k % 3]},Succeeded,{10 * k},{10 * k + 500 + 40 * k},{10 * k + 5}"
            for k in range(30)]
    path.write_text(HEADER + "\n" + "\n".join(rows) + "\n")
    _, s = simulate(SimSpec(path, "singularity", 48, reference_policy(), fmt="alibaba-v2023"))
    assert s["jobs"] == 30 and s["tier_rule"] == "trace"
    assert set(s["jobs_by_tier"]) == {"premium", "standard", "basic"}
    assert s["sla_attainment"]["premium"] == 1.0 and s["lost_gpu_hours"] == 0


PHILLY_GOOD = {"timestamp": "2017-10-01 00:00:00", "duration": "10", "num_gpus": "2",
               "gpu_time": "20", "cluster": "a"}
ALIBABA_GOOD = {"name": "p", "cpu_milli": "1000", "memory_mib": "100", "num_gpu": "1",
                "gpu_milli": "1000", "gpu_spec": "", "qos": "LS", "pod_phase": "Succeeded",
                "creation_time": "0", "deletion_time": "50", "scheduled_time": "10"}
ABSURD = ["nan", "inf", "-inf", "1e300", "-1", str(10 ** 30), "twelve"]
NUMERIC = [("philly", PHILLY_GOOD, c) for c in ("duration", "num_gpus", "gpu_time")] + [
    ("alibaba-v2023", ALIBABA_GOOD, c) for c in ("cpu_milli", "memory_mib", "num_gpu", "gpu_milli",
                                                 "creation_time", "deletion_time",
                                                 "scheduled_time")]


def write_rows(path, good: dict[str, str], rows: list[dict[str, str]]) -> None:
    lines = [",".join(good)] + [",".join(r[c] for c in good) for r in rows]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("fmt, good, column", NUMERIC)
@pytest.mark.parametrize("value", ABSURD)
def test_every_numeric_column_refuses_an_absurd_value_naming_file_line_and_column(
        tmp_path, fmt, good, column, value):
    path = tmp_path / "t.csv"
    if value == "-1" and column.endswith("_time") and fmt == "alibaba-v2023":
        value = "-1e12"                                  # relative times may be negative
    write_rows(path, good, [good, {**good, column: value}])
    with pytest.raises(TraceError) as err:
        read_trace(path, fmt)
    text = str(err.value)
    assert text.startswith(f"{path}:3: ") and column in text, text


def test_a_value_at_its_bound_is_accepted_and_one_past_it_is_refused(tmp_path):
    path = tmp_path / "t.csv"
    write_rows(path, PHILLY_GOOD, [{**PHILLY_GOOD, "num_gpus": str(MAX_GPUS),
                                    "duration": repr(MAX_DURATION_S)}])
    [job] = read_trace(path, "philly")
    assert (job.world_size, job.duration_s) == (MAX_GPUS, MAX_DURATION_S)
    for gpus in (str(MAX_GPUS + 1), "1e-320", "0.5"):
        write_rows(path, PHILLY_GOOD, [{**PHILLY_GOOD, "num_gpus": gpus}])
        with pytest.raises(TraceError, match=rf"t.csv:2: column num_gpus: must be a whole "
                                             rf"number in \[1, {MAX_GPUS}\]"):
            read_trace(path, "philly")
    write_rows(path, ALIBABA_GOOD, [{**ALIBABA_GOOD, "scheduled_time": "0",
                                     "deletion_time": repr(MAX_DURATION_S * 2)}])
    with pytest.raises(TraceError, match=r"t.csv:2: duration deletion_time - scheduled_time"):
        read_trace(path, "alibaba-v2023")


def test_a_trace_that_is_not_utf8_or_not_csv_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "t.csv"
    body = b"timestamp,duration,num_gpus,gpu_time,cluster\n2017-10-01 00:00:00,1,1,1,\xff\n"
    path.write_bytes(body)
    with pytest.raises(TraceError, match=rf"t.csv:2: not UTF-8: byte 0xff at byte offset "
                                         rf"{body.index(0xff)} of the file"):
        read_trace(path, "philly")
    path.write_bytes(b"timestamp,duration,num_gpus,gpu_time,cluster\n2017-10-01 00:00:00,1,1,1,"
                     + b"a" * 1_000_000 + b"\n")
    with pytest.raises(TraceError, match=r"t.csv:2: not CSV: field larger than field limit"):
        read_trace(path, "philly")
    path.write_bytes(b"\xef\xbb\xbf" + b"timestamp,duration,num_gpus,gpu_time,cluster\n"
                     b"2017-10-01 00:00:00,1,1,1,a\n")
    assert len(read_trace(path, "philly")) == 1          # a UTF-8 byte-order mark is fine


def test_elastic_ranges_of_large_or_prime_world_sizes_are_found_at_once():
    brute = lambda w: next(d for d in range(1, w + 1) if w % d == 0 and w // d <= 8)
    for w in (7, 12, 97, 360, 1024, 99991, 65536, MAX_GPUS):
        assert elastic_range(w) == (brute(w), w)


def test_simulate_says_which_pods_it_dropped_rounded_or_took_as_services(tmp_path):
    import subprocess
    import sys
    path = tmp_path / "pods.csv"
    path.write_text(HEADER + "\n" + "\n".join([
        "a,1,1,1,1000,,LS,Succeeded,0,100,0", "b,1,1,0,0,,BE,Succeeded,1,50,2",
        "c,1,1,1,250,,BE,Succeeded,2,60,3", "d,1,1,1,1000,,BE,Pending,3,,",
        "e,1,1,2,1000,,Guaranteed,Running,4,,5"]) + "\n")
    r = subprocess.run([sys.executable, "-m", "slurm_singularity.cli.admin", "simulate",
                        "--no-progress", "--trace", str(path), "--format", "alibaba-v2023",
                        "--scheduler", "singularity", "--gpus", "8", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert ("pods dropped: 1 no GPU (num_gpu 0), 1 never scheduled (Pending or no "
            "scheduled_time); 1 pods asking for a share of a GPU rounded up to one whole GPU; "
            "1 services") in r.stderr, r.stderr
