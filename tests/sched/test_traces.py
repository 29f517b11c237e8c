"""Trace readers and the seeded tier rule."""

from __future__ import annotations

import pytest

from slurm_singularity.policy.api import Tier
from slurm_singularity.sched.sim.trace import (TraceError, assign_tiers, describe_rule,
                                               elastic_range, read_alibaba, read_trace)

HEADER = ("name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,"
          "deletion_time,scheduled_time")


def test_alibaba_pods_become_jobs_with_their_qos_as_tier(tmp_path):
    path = tmp_path / "pods.csv"
    path.write_text("\n".join([
        HEADER,
        "p1,1000,100,2,1000,V100,LS,Succeeded,100,700,200",
        "p2,1000,100,1,500,,BE,Succeeded,50,450,60",
        "p3,1000,100,0,0,,BE,Succeeded,50,450,60",          # no GPU: skipped
        "p4,1000,100,1,1000,T4,Burstable,Running,70,,80",  # not finished: skipped
    ]) + "\n")
    jobs = read_alibaba(path)
    assert [(j.submit_s, j.duration_s, j.world_size, j.account, j.tier) for j in jobs] == [
        (0.0, 390.0, 1, "any", Tier.BASIC), (50.0, 500.0, 2, "V100", Tier.PREMIUM)]
    assert [j.tier for j in assign_tiers(jobs, "trace")] == [Tier.BASIC, Tier.PREMIUM]


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
