"""policy.conf is the slurm.conf fragment through which Slurm enforces the
tiers: partitions with PriorityTier, PreemptMode and GraceTime per tier."""

from __future__ import annotations

from slurm_singularity.policy import default_policy_path
from slurm_singularity.policy.load import load_policy, parse_policy
from slurm_singularity.policy.render import render_policy_files


def _partitions(conf: str) -> dict[str, dict[str, str]]:
    out = {}
    for line in conf.splitlines():
        if line.startswith("PartitionName="):
            fields = dict(item.split("=", 1) for item in line.split())
            out[fields["PartitionName"]] = fields
    return out


def test_the_default_policy_renders_three_partitions_over_the_given_nodes():
    files = render_policy_files(load_policy(default_policy_path()), "n[1-4]")
    conf = files["policy.conf"]
    assert "PreemptType=preempt/partition_prio" in conf
    assert "PreemptMode=REQUEUE" in conf
    parts = _partitions(conf)
    assert set(parts) == {"premium", "standard", "basic"}
    assert {p["Nodes"] for p in parts.values()} == {"n[1-4]"}
    assert parts["premium"]["PreemptMode"] == "OFF"
    assert parts["standard"]["PreemptMode"] == "REQUEUE"
    assert parts["basic"]["GraceTime"] == "30"
    assert int(parts["premium"]["PriorityTier"]) > int(parts["standard"]["PriorityTier"]) \
        > int(parts["basic"]["PriorityTier"])
    assert [n for n, p in parts.items() if p["Default"] == "YES"] == ["standard"]
    assert "function slurm_job_submit" in files["job_submit.lua"]


def test_standard_is_not_preemptible_when_the_policy_says_so():
    text = default_policy_path().read_text().replace(
        'preempt_mode = "requeue"    # checkpoint', 'preempt_mode = "off"    # checkpoint'
    ).replace('preemptible_by = ["premium"]', "preemptible_by = []")
    parts = _partitions(render_policy_files(parse_policy(text), "n1")["policy.conf"])
    assert parts["standard"]["PreemptMode"] == "OFF"
    assert parts["basic"]["PreemptMode"] == "REQUEUE"


def test_a_policy_without_preemption_turns_preemption_off():
    text = default_policy_path().read_text().replace(
        'preemptible_by = ["premium"]', "preemptible_by = []").replace(
        'preemptible_by = ["premium", "standard"]', "preemptible_by = []")
    conf = render_policy_files(parse_policy(text), "n1")["policy.conf"]
    assert "PreemptType=preempt/none" in conf
    assert all(p["PreemptMode"] == "OFF" for p in _partitions(conf).values())
