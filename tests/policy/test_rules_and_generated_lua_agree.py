"""The rules of job_submit.lua are written once in Python (rules.py, used by
`job explain`) and generated as Lua: both must decide every submission of
the table the same way, with the same message."""

from __future__ import annotations

import pytest

from luaharness import load_lua, run_job_modify, run_job_submit
from submission_table import CASES
from slurm_singularity.cli import admin
from slurm_singularity.policy import default_policy_path
from slurm_singularity.policy.load import load_policy
from slurm_singularity.policy.render import render_job_submit
from slurm_singularity.policy.rules import Decision, Rejection, Submission, decide, gpus_in_tres
from slurm_singularity.policy.sbatch_args import parse_sbatch_args

POLICY = load_policy(default_policy_path())
LUA = load_lua()
SCRIPT = render_job_submit(POLICY)


def _needs_lua():
    if LUA is None:
        pytest.skip("liblua5.1 is not installed (apt-get install liblua5.1-0), so the "
                    "generated Lua cannot be run here")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_rules_decide_the_table(case):
    result = decide(POLICY, case.sub)
    if case.partition is None:
        assert isinstance(result, Rejection)
        assert result.message.startswith("singularity: ")
        assert case.expect in result.message
    else:
        assert isinstance(result, Decision), result
        assert result.partition == case.partition
        assert result.tag == case.expect
        assert result.requeue is True


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_generated_lua_decides_the_table_like_the_rules(case):
    _needs_lua()
    out = run_job_submit(LUA, SCRIPT, case.sub)
    result = decide(POLICY, case.sub)
    if isinstance(result, Rejection):
        assert out["rc"] == "-1"
        assert out["messages"] == [result.message]
        assert "partition" not in out or out["partition"] == case.sub.partition
    else:
        assert out["rc"] == "0", out["messages"]
        assert out["partition"] == result.partition
        assert out["requeue"] == "1"
        assert out["admin_comment"] == result.tag
        assert out["env"] == result.env
        if result.max_nodes is not None:
            assert out["max_nodes"] == str(result.max_nodes)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_job_explain_parses_the_sbatch_options_into_the_same_submission(case):
    sub, ignored = parse_sbatch_args(list(case.argv))
    assert ignored == []
    assert sub == case.sub


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_job_explain_prints_the_decision_or_the_rejection(case, capsys):
    rc = admin.main(["job", "explain", *case.argv])
    out = capsys.readouterr().out
    assert case.expect in out
    assert rc == (1 if case.partition is None else 0)
    if case.partition is not None:
        assert f"partition       {case.partition}" in out


def test_lua_leaves_the_environment_of_an_interactive_job_alone():
    _needs_lua()
    out = run_job_submit(LUA, SCRIPT, Submission(sla="basic", batch=False))
    assert out["rc"] == "0" and out["partition"] == "basic" and out["env"] == {}


def test_a_cancel_tier_does_not_requeue_in_both():
    _needs_lua()
    text = default_policy_path().read_text().replace(
        'preempt_mode = "requeue"\ngrace_time_s = 30', 'preempt_mode = "cancel"\ngrace_time_s = 30')
    from slurm_singularity.policy.load import parse_policy
    policy = parse_policy(text)
    sub = Submission(sla="basic")
    assert decide(policy, sub).requeue is False
    assert run_job_submit(LUA, render_job_submit(policy), sub)["requeue"] == "0"


@pytest.mark.parametrize("tres,gpus", [
    (None, 0), ("", 0), ("gres:gpu:3", 3), ("gres/gpu:3", 3), ("gres:gpu", 1),
    ("gres:gpu:a100:2,gres:gpu:v100:1", 3), ("gres:mps:100", 0), ("gres:gpu:", 1),
    # the other spellings of Slurm 22.05 that the one reader (slurm/gres.py) knows
    ("gpu:4(S:0-1)", 4), ("gres:gpu:a100:4(S:0,1)", 4), ("gres/gpu=2", 2),
    ("gres/gpu:a100=2", 2), ("cpu=1,gres/gpu=4,gres/gpu:a100=4,node=1", 4),
    ("gres:gpu:2(S:0,1),gres:mps:100", 2), ("N/A", 0), ("(null)", 0), ("gres:gpu:1K", 1024),
])
def test_gpus_are_counted_from_tres_strings_alike(tres, gpus):
    assert gpus_in_tres(tres) == gpus
    if LUA is not None and gpus <= 8:
        d = max(gpus, 1)
        out = run_job_submit(LUA, SCRIPT, Submission(tres_per_job=tres))
        assert out["rc"] == "0"
        assert out["env"]["SINGULARITY_ELASTIC"] == f"{d}:{d}"


def test_a_user_cannot_move_a_job_to_another_tier_by_changing_its_partition():
    _needs_lua()
    rc, msg = run_job_modify(LUA, SCRIPT, {"partition": "premium"}, {"partition": "basic"}, 1000)
    assert rc != 0 and "the partition follows the tier" in msg
    assert run_job_modify(LUA, SCRIPT, {"partition": "premium"}, {"partition": "basic"}, 0)[0] == 0
    assert run_job_modify(LUA, SCRIPT, {"time_limit": 10}, {"partition": "basic"}, 1000)[0] == 0


@pytest.mark.parametrize("tres", ["gres/gpu=two", "gres:gpu:2(S:0-1", "gres::2"])
def test_a_gres_spelling_neither_can_read_is_rejected_alike_naming_gres(tres):
    rejection = decide(POLICY, Submission(tres_per_job=tres))
    assert isinstance(rejection, Rejection) and rejection.option == "--gres"
    assert "cannot read" in rejection.message
    _needs_lua()
    out = run_job_submit(LUA, SCRIPT, Submission(tres_per_job=tres))
    assert out["rc"] == "-1" and out["messages"] == [rejection.message], (out, rejection)
