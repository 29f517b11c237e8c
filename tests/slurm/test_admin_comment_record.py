"""The AdminComment as one typed record (issue 18, part 3): every record the
daemon writes reads back as itself, and text an operator, another tool or
an older version wrote either reads as a record or is refused with an
error that names the field, never anything else."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from slurm_singularity import contract
from slurm_singularity.slurm.admin_comment import (MAX_SIZE, AdminComment, AdminCommentError,
                                                   ResizeStep)

TAG = "singularity:sla=basic,elastic=8:32,ws=32"
WHOLE_S = st.integers(1, 4_000_000_000).map(float)


@st.composite
def records(draw) -> AdminComment:
    lo = draw(st.integers(1, 64))
    tag = contract.format_job_tag(draw(st.sampled_from(["basic", "standard", "premium"])),
                                  (lo, draw(st.integers(lo, 128))),
                                  draw(st.integers(1, contract.MAX_WORLD_SIZE)))
    tag += draw(st.sampled_from(["", ",transparent=1", ",later=x:y"]))
    work = draw(st.integers(0, 10**9)) / 10
    resized = draw(st.none() | st.integers(1, MAX_SIZE))
    if draw(st.booleans()):
        return AdminComment(tag, work_s=work, resized=resized)
    resize_to, resize_at = draw(st.integers(0, MAX_SIZE)), draw(WHOLE_S)
    step = draw(st.sampled_from(ResizeStep))
    if step is ResizeStep.MARKED:
        step_at = 0.0
    elif step is ResizeStep.SIGNALLED:
        step_at = draw(st.just(0.0) | WHOLE_S.filter(lambda t: t != resize_at))
    else:
        step_at = draw(WHOLE_S)
    return AdminComment(tag, resize_to, resize_at, work, step, step_at, resized)


@settings(max_examples=300, deadline=None)
@given(records())
def test_every_record_the_daemon_writes_reads_back_as_itself(record):
    text = record.render()
    again = AdminComment.parse(text)
    assert again == record, text
    assert again.render() == text
    assert again.job_tag == contract.parse_job_tag(record.tag)
    # scontrol pads the text with a blank
    assert AdminComment.parse(f" {text} ") == record


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_text_that_is_not_the_projects_tag_is_someone_elses_and_holds_no_marks(text):
    record = AdminComment.parse(text)
    if not text.strip().startswith(contract.JOB_TAG_PREFIX):
        assert record.job_tag is None and record.tag == text.strip()
        assert (record.resize_to, record.work_s, record.resized) == (None, 0.0, None)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["work", "resized", "resize", "step", "unsignalled", "ws",
                                 "elastic", "sla", "x"]), max_size=5),
       st.lists(st.text(st.sampled_from("0123456789@.=-x:e, \u00b2"), max_size=8), max_size=5))
def test_any_field_after_the_tag_reads_or_is_refused_naming_a_field(keys, values):
    text = TAG + "".join(f",{k}={v}" if v else f",{k}" for k, v in zip(keys, values + [""] * 5))
    try:
        record = AdminComment.parse(text)
    except AdminCommentError as exc:
        assert str(exc).startswith("AdminComment "), exc
        assert exc.field.split(" ", 1)[1] in ("tag", "work", "resized", "resize", "step",
                                               "unsignalled"), exc
        return
    assert AdminComment.parse(record.render()) == record


@pytest.mark.parametrize("text, field, why", [
    (TAG + ",resize=16@x", "resize", "'x' is not a number"),
    (TAG + ",resize=16", "resize", "SIZE@EPOCH"),
    (TAG + ",resize=-1@5", "resize", "'-1' is not a whole number"),
    (TAG + ",resize=16@5,resize=8@6", "resize", "appears twice"),
    (TAG + ",work=nan", "work", "number of seconds"),
    (TAG + ",work=-3", "work", "number of seconds"),
    (TAG + ",resized=0", "resized", "1..1048576"),
    (TAG + ",resize=99999999@5", "resize", "0..1048576"),
    (TAG + ",step=signalled@5", "step", "without a resize"),
    (TAG + ",unsignalled", "unsignalled", "without a resize"),
    (TAG + ",resize=8@5,unsignalled=1", "unsignalled", "takes no value"),
    (TAG + ",resize=8@5,step=paused@6", "step", "signalled|requeued|killed"),
    (TAG + ",resize=8@5,unsignalled,step=killed@9", "step", "both"),
    ("singularity:sla=basic,ws=8,resize=8@5", "tag", "missing field 'elastic'"),
    ("singularity:sla=basic,elastic=8:4,ws=8", "tag", "MIN <= MAX"),
])
def test_a_malformed_admin_comment_is_refused_with_an_error_naming_the_field(text, field, why):
    with pytest.raises(AdminCommentError) as caught:
        AdminComment.parse(text)
    assert caught.value.field == f"AdminComment {field}", caught.value
    assert why in str(caught.value), caught.value


def test_a_100_kb_admin_comment_gives_a_short_error():
    with pytest.raises(AdminCommentError) as caught:
        AdminComment.parse(TAG + ",resize=16@" + "9" * 100_000)
    assert len(str(caught.value)) < 300, len(str(caught.value))


def test_a_record_built_with_a_field_out_of_range_is_refused_naming_it():
    for kwargs, field in [(dict(resize_to=-1, resize_at=5.0), "resize"),
                          (dict(work_s=float("inf")), "work_s"),
                          (dict(resize_to=8, resize_at=float("nan")), "resize_at"),
                          (dict(step=ResizeStep.KILLED), "step"),
                          (dict(resized=0), "resized")]:
        with pytest.raises(AdminCommentError, match=f"AdminComment {field}:"):
            AdminComment(TAG, **kwargs)
    with pytest.raises(AdminCommentError, match="AdminComment tag: .*marks need"):
        AdminComment("an operator's note", resize_to=8, resize_at=5.0)
    with pytest.raises(AdminCommentError, match="AdminComment tag: .*holds the mark 'resize'"):
        AdminComment(TAG + ",resize=8@5")
