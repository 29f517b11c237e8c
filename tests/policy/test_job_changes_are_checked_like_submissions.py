"""A change to a job (``scontrol update``, job_submit.lua's slurm_job_modify)
is decided by the submission rules again, by rules.py's ``decide_change``
and by the generated Lua alike; and an account's ``members`` bind the user,
whichever route names the account (``--account`` or the user's default
account in Slurm)."""

from __future__ import annotations

import pytest

from luaharness import load_lua, run_job_modify, run_job_submit
from slurm_singularity.policy import default_policy_path
from slurm_singularity.policy.api import PolicyError
from slurm_singularity.policy.load import parse_policy
from slurm_singularity.policy.render import render_job_submit
from slurm_singularity.policy.rules import Decision, Rejection, Submission, decide, decide_change

TEXT = default_policy_path().read_text() + '''
[accounts.small]
tiers = ["basic"]
gpu_quota = 2
members = ["sing-u1"]
'''
POLICY = parse_policy(TEXT)
LUA = load_lua()
SCRIPT = render_job_submit(POLICY)

#: A held basic job of sing-u1 on one GPU, as slurmctld holds it.
HELD = Submission(partition="basic", account="small", tres_per_node="gres:gpu:1", min_nodes=1,
                  max_nodes=1, user="sing-u1")
HELD_TAG = "singularity:sla=basic,elastic=1:1,ws=1"

CHANGES = [
    ("more nodes and GPUs per node", Submission(min_nodes=2, max_nodes=2,
                                                tres_per_node="gres:gpu:4"),
     "job update refused: --elastic=1:1: the job asks for 8 GPUs"),
    ("GPUs beyond the quota inside the range", Submission(tres_per_node="gres:gpu:3"),
     "the job asks for 3 GPUs"),
    ("another partition", Submission(partition="premium"), "the partition follows the tier"),
    ("an account outside the policy", Submission(account="nobody"),
     "job update refused: --account=nobody: not an account of the policy"),
    ("a time limit", Submission(), None),
    ("an unset node count", Submission(min_nodes=4294967294), None),
]


def _rec(sub: Submission, tag: str | None) -> dict[str, object]:
    rec: dict[str, object] = {k: v for k, v in (
        ("partition", sub.partition), ("account", sub.account),
        ("tres_per_node", sub.tres_per_node), ("min_nodes", sub.min_nodes),
        ("max_nodes", sub.max_nodes), ("user_name", sub.user)) if v is not None}
    if tag is not None:
        rec["admin_comment"] = tag
    return rec


def _desc(sub: Submission) -> dict[str, object]:
    return {k: getattr(sub, k) for k in ("partition", "account", "tres_per_node", "min_nodes",
                                          "max_nodes") if getattr(sub, k) is not None}


@pytest.mark.parametrize("name,change,expect", CHANGES, ids=[c[0] for c in CHANGES])
def test_a_change_by_the_user_is_decided_by_the_rules_and_the_lua_alike(name, change, expect):
    result = decide_change(POLICY, HELD, change, HELD_TAG, uid=1000)
    if expect is None:
        assert result is None
    else:
        assert isinstance(result, Rejection) and expect in result.message, result
    if LUA is None:
        pytest.skip("liblua5.1 is not installed, the Lua cannot run here")
    rc, messages = run_job_modify(LUA, SCRIPT, _desc(change), _rec(HELD, HELD_TAG), 1000)
    if result is None:
        assert rc == 0, messages
    else:
        assert rc not in (0, -1) and messages == result.message


def test_root_may_change_any_job():
    change = Submission(min_nodes=4, max_nodes=4, tres_per_node="gres:gpu:8")
    assert decide_change(POLICY, HELD, change, HELD_TAG, uid=0) is None
    if LUA is not None:
        assert run_job_modify(LUA, SCRIPT, _desc(change), _rec(HELD, HELD_TAG), 0)[0] == 0


def test_a_premium_job_cannot_move_to_an_account_without_the_premium_tier():
    job = Submission(partition="premium", account="research", user="root")
    result = decide_change(POLICY, job, Submission(account="default"),
                           "singularity:sla=premium,elastic=1:1,ws=1", uid=1000)
    assert isinstance(result, Rejection)
    assert "--sla=premium: account default may not use this tier" in result.message


def test_a_job_without_a_tag_is_checked_on_its_own_options():
    change = Submission(tres_per_node="gres:gpu:8", min_nodes=5)
    result = decide_change(POLICY, Submission(partition="basic", user="root"), change, None, 7)
    assert isinstance(result, Rejection) and "gpu_quota of 32" in result.message


@pytest.mark.parametrize("sub,expect", [
    (Submission(account="small", user="sing-u2", sla="basic"),
     "--account=small: user sing-u2 is not a member of account small"),
    (Submission(default_account="small", user="sing-u2", sla="basic"),
     "no --account: your default account small: user sing-u2 is not a member"),
    (Submission(default_account="small", user="sing-u1", sla="premium"),
     "--sla=premium: account small may not use this tier"),
    (Submission(default_account="small", user="sing-u1", sla="basic"), None),
    (Submission(account="small", user="sing-u1", sla="basic", tres_per_node="gres:gpu:2",
                min_nodes=1, max_nodes=2), "the job may hold 4 GPUs"),
])
def test_the_account_a_job_really_runs_under_decides_its_tier(sub, expect):
    result = decide(POLICY, sub)
    if expect is None:
        assert isinstance(result, Decision) and result.account == "small"
    else:
        assert isinstance(result, Rejection) and expect in result.message, result
    if LUA is None:
        pytest.skip("liblua5.1 is not installed, the Lua cannot run here")
    out = run_job_submit(LUA, SCRIPT, sub)
    if expect is None:
        assert out["rc"] == "0" and out["admin_comment"] == result.tag
    else:
        assert out["rc"] == "-1" and out["messages"] == [result.message]


@pytest.mark.parametrize("members,why", [
    ('["Root"]', "is not a login name"), ('["a b"]', "is not a login name"),
    ('[1]', "must be a string"), ('"u1"', "must be a list of login names"),
    ('["u1", "u1"]', "lists a user twice"),
])
def test_a_bad_members_list_is_refused_naming_the_key(members, why):
    with pytest.raises(PolicyError) as err:
        parse_policy(TEXT.replace('members = ["sing-u1"]', f"members = {members}"))
    assert "accounts.small.members" in str(err.value) and why in str(err.value)


@pytest.mark.parametrize("marks", [",resize=0@1700000000,unsignalled",
                                   ",work=12.5,resize=4@1700000000,step=requeued@1700000003"])
def test_a_change_to_a_job_the_daemon_is_acting_on_is_decided_by_its_tag_alike(marks):
    # the daemon appends its marks to the tag while an action is in flight;
    # the rules read the tag through them, as the Lua reads the tag's prefix
    change = Submission(min_nodes=2, max_nodes=2, tres_per_node="gres:gpu:4")
    result = decide_change(POLICY, HELD, change, HELD_TAG + marks, uid=1000)
    assert isinstance(result, Rejection)
    assert "job update refused: --elastic=1:1: the job asks for 8 GPUs" in result.message
    if LUA is None:
        pytest.skip("liblua5.1 is not installed, the Lua cannot run here")
    rc, messages = run_job_modify(LUA, SCRIPT, _desc(change), _rec(HELD, HELD_TAG + marks), 1000)
    assert rc not in (0, -1) and messages == result.message
