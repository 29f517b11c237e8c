"""The job tag in AdminComment is written by job_submit.lua and read by the
scheduler daemon: it round-trips, tolerates appended marks and rejects a
malformed tag with a clear error."""

from __future__ import annotations

import pytest

from slurm_singularity import contract


def test_a_job_tag_round_trips():
    tag = contract.format_job_tag("basic", (2, 8), 8)
    assert tag == "singularity:sla=basic,elastic=2:8,ws=8"
    parsed = contract.parse_job_tag(tag)
    assert parsed == contract.JobTag("basic", (2, 8), 8)
    assert (parsed.sla, parsed.elastic, parsed.world_size) == ("basic", (2, 8), 8)
    assert parsed.render() == tag


def test_marks_appended_by_the_daemon_and_padding_are_tolerated():
    parsed = contract.parse_job_tag("singularity:sla=premium,elastic=4:4,ws=4,work=12.0 ")
    assert parsed.elastic == (4, 4) and parsed.world_size == 4
    assert parsed.extra == {"work": "12.0"}


def test_another_admin_comment_is_not_a_tag():
    assert contract.parse_job_tag(None) is None
    assert contract.parse_job_tag("moved by admin") is None


@pytest.mark.parametrize("text,needle", [
    ("singularity:sla=basic,elastic=8:2,ws=8", "needs 1 <= MIN <= MAX"),
    ("singularity:sla=basic,ws=8", "missing field 'elastic'"),
    ("singularity:sla=basic,elastic=2:8,ws=x", "not an integer"),
    ("singularity:sla=basic,elastic", "is not key=value"),
    ("singularity:elastic=2:8,ws=8", "missing field 'sla'"),
])
def test_a_malformed_tag_is_a_contract_error(text, needle):
    with pytest.raises(contract.ContractError, match=needle):
        contract.parse_job_tag(text)
