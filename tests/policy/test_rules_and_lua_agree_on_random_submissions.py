"""Property: for any submission, the generated job_submit.lua and rules.py
make the same decision with the same message (hypothesis draws the
submissions, including junk option values)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from luaharness import load_lua, run_job_submit
from slurm_singularity.policy import default_policy_path
from slurm_singularity.policy.load import load_policy
from slurm_singularity.policy.render import render_job_submit
from slurm_singularity.policy.rules import Decision, Submission, decide

POLICY = load_policy(default_policy_path())
LUA = load_lua()
SCRIPT = render_job_submit(POLICY)

_counts = st.one_of(st.integers(0, 20).map(str), st.sampled_from(["", "x", "08", "1000000",
                                                                  "-1", "2.0", "65537"]))
_elastic = st.one_of(st.builds(lambda a, b: f"{a}:{b}", st.integers(0, 17), st.integers(0, 17)),
                     st.sampled_from(["2:x", ":", "1:2:3", "4", "0:0", "1:65537"]))
_tres = st.one_of(st.none(), st.builds(lambda n: f"gres:gpu:{n}", st.integers(0, 9)),
                  st.sampled_from(["gres/gpu:2", "gres:gpu", "gres:mps:1",
                                   "gres:gpu:a:1,gres:gpu:b:2"]))

submissions = st.builds(
    Submission,
    sla=st.one_of(st.none(), st.sampled_from(["premium", "standard", "basic", "gold", ""])),
    elastic=st.one_of(st.none(), _elastic),
    world_size=st.one_of(st.none(), _counts),
    ckpt_dir=st.one_of(st.none(), st.sampled_from(["/ck", "ck", "/a,b", ""])),
    proxy=st.one_of(st.none(), st.sampled_from(["on", "off", "yes"])),
    deterministic=st.one_of(st.none(), st.sampled_from(["on", "off", "0"])),
    transparent=st.one_of(st.none(), st.just("")),
    account=st.one_of(st.none(), st.sampled_from(["default", "Research", "nobody", ""])),
    partition=st.one_of(st.none(), st.sampled_from(["basic", "premium", "debug", ""])),
    tres_per_job=_tres, tres_per_node=_tres,
    min_nodes=st.one_of(st.none(), st.integers(1, 5), st.just(4294967294)),
    max_nodes=st.one_of(st.none(), st.integers(0, 5), st.just(4294967294)),
    batch=st.booleans(),
    default_account=st.one_of(st.none(), st.sampled_from(["default", "research", "root", ""])),
    user=st.one_of(st.none(), st.sampled_from(["root", "sing-u1"])),
)


@pytest.mark.skipif(LUA is None, reason="liblua5.1 is not installed, the Lua cannot run here")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(submissions)
def test_lua_and_rules_agree(sub):
    out = run_job_submit(LUA, SCRIPT, sub)
    result = decide(POLICY, sub)
    if isinstance(result, Decision):
        assert out["rc"] == "0", (sub, out)
        assert (out["partition"], out["admin_comment"], out["env"]) == \
            (result.partition, result.tag, result.env)
        assert out["requeue"] == ("1" if result.requeue else "0")
        if result.max_nodes is not None:
            assert out["max_nodes"] == str(result.max_nodes)
    else:
        assert out["rc"] == "-1", (sub, result)
        assert out["messages"] == [result.message]
