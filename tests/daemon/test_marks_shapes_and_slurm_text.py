"""Pure pieces of the daemon and the Slurm layer, on text that Slurm 22.05
printed on the local cluster (copied here so that odd cases can be tested
without a cluster: a stale node count, several runs in sacct)."""

from __future__ import annotations

import pytest

from slurm_singularity.sched.executor import request_shape
from slurm_singularity.sched.marks import AdminCommentError, Marks, ResizeStep, read_marks
from slurm_singularity.slurm.cli import parse_sacct_run, parse_scontrol_record

TAG = "singularity:sla=basic,elastic=8:32,ws=32"


def test_the_daemons_marks_survive_a_round_trip_through_admin_comment():
    marks = Marks(TAG, resize_to=16, resize_at=1795729895.0, work_s=12.5)
    assert marks.render() == TAG + ",work=12.5,resize=16@1795729895"
    assert read_marks(marks.render()) == marks
    assert read_marks(TAG) == Marks(TAG)
    # Slurm pads AdminComment with a space in scontrol's output
    assert read_marks(TAG + ",resize=0@5 ").resize_to == 0
    waiting = Marks(TAG, resize_to=8, resize_at=5.0, step=ResizeStep.MARKED)
    assert waiting.render() == TAG + ",resize=8@5,unsignalled"
    assert read_marks(waiting.render()) == waiting
    requeued = Marks(TAG, resize_to=8, resize_at=5.0, step=ResizeStep.REQUEUED, step_at=40.0)
    assert requeued.render() == TAG + ",resize=8@5,step=requeued@40"
    assert read_marks(requeued.render()) == requeued


def test_a_resize_done_by_a_requeue_is_remembered_until_the_next_action():
    done = Marks(TAG, resize_to=16, resize_at=5.0, work_s=3.0).cleared(resized=16)
    assert done.render() == TAG + ",work=3.0,resized=16"
    assert read_marks(done.render()) == done
    # a new action forgets it; a value that is no size is refused, naming the field
    assert Marks(TAG, 8, 9.0, 3.0).render() == TAG + ",work=3.0,resize=8@9"
    for bad in ("0", "x", "\u00b2", "-4", "1e3"):
        with pytest.raises(AdminCommentError, match="AdminComment resized"):
            read_marks(TAG + f",resized={bad}")


def test_marks_are_read_only_from_the_projects_own_tag():
    # an operator's note, or a stale mark someone copied, is not the daemon's
    for text in ("resize=16@1", "moved,resize=16@1", "x singularity:sla=basic,resize=16@1"):
        assert read_marks(text) == Marks(text.strip()), text
    # inside a tag, a mark is a whole field, never a substring of another one
    assert read_marks(TAG + ",note=resize=16@1").resize_to is None
    with pytest.raises(AdminCommentError, match="AdminComment resize: cannot read '?16@x"):
        read_marks(TAG + ",resize=16@x")


def test_a_whole_node_shrink_is_done_in_place_and_anything_else_by_requeue():
    from slurm_singularity.cli.job import apply_resize_script, inplace_nodes
    rec = {"AdminComment": TAG + ",resize=16@5 ", "NumNodes": "4", "TresPerNode": "gres:gpu:8"}
    assert inplace_nodes(rec) == 2
    assert inplace_nodes({**rec, "AdminComment": TAG + ",resize=12@5"}) is None  # 6 per node
    assert inplace_nodes({**rec, "AdminComment": TAG + ",resize=32@5"}) is None  # a grow
    assert inplace_nodes({**rec, "AdminComment": TAG}) is None                   # no resize
    assert inplace_nodes({**rec, "AdminComment": TAG + ",resize=0@5"}) is None   # preempted
    # what scontrol update NumNodes=1 wrote from inside job 4 on the local cluster
    env = {"SLURM_NTASKS": "2", "SLURM_NNODES": "2", "KEEP": "x"}
    apply_resize_script('export SLURM_NODELIST="n1"\nexport SLURM_NNODES=1\n'
                        'export SLURM_JOB_CPUS_PER_NODE="1"\nunset SLURM_NTASKS\n', env)
    assert env == {"SLURM_NODELIST": "n1", "SLURM_NNODES": "1", "SLURM_JOB_CPUS_PER_NODE": "1",
                   "KEEP": "x"}


@pytest.mark.parametrize("devices, shape", [
    (4, (1, 4)), (8, (1, 8)), (12, (2, 6)), (16, (2, 8)), (24, (3, 8)), (32, (4, 8)), (9, (3, 3)),
])
def test_a_size_becomes_the_fewest_nodes_with_equal_gpus_each(devices, shape):
    assert request_shape(devices, 8) == shape


def test_scontrol_records_keep_values_with_spaces():
    rec = parse_scontrol_record("JobId=5 JobName=a b Comment=x y z Partition=basic "
                                "AdminComment=singularity:sla=basic,elastic=8:32,ws=32 ")
    assert rec["JobName"] == "a b" and rec["Comment"] == "x y z"
    assert rec["Partition"] == "basic" and rec["AdminComment"].startswith("singularity:")


def _run(start: str, end: str, state: str, elapsed: int = 10):
    return parse_sacct_run(f"7|{start}|{end}|{elapsed}|{state}|0:0|n1|gres/gpu=4|basic|/w")


def test_job_show_pairs_runs_by_time_and_marks_a_run_killed_past_its_grace_time():
    from datetime import datetime

    from slurm_singularity.cli.admin_job import build_rows
    from slurm_singularity.runtime.api import HistoryRecord, StopReason

    def t(hms: str) -> float:
        return datetime.fromisoformat(f"2026-11-26T{hms}").timestamp()

    runs = [_run("2026-11-26T10:00:00", "2026-11-26T10:00:20", "REQUEUED"),
            _run("2026-11-26T10:00:31", "2026-11-26T10:01:10", "REQUEUED", elapsed=39),
            _run("2026-11-26T10:01:21", "2026-11-26T10:01:40", "COMPLETED")]
    history = [  # run 2 was SIGKILLed mid-checkpoint: it left no record
        HistoryRecord(t("10:00:01"), t("10:00:20"), 4, 8, 0, 12, StopReason.PREEMPTED, True, 0, 75),
        HistoryRecord(t("10:01:22"), t("10:01:40"), 8, 8, 12, 40, StopReason.FINISHED, True, 0, 0)]
    rows = build_rows(runs, history)
    assert [r.stopped for r in rows] == ["resized", "killed", "finished"]
    assert rows[1].steps == "12..?" and rows[1].time_lost_s == 39.0 and rows[1].checkpoint == "no"
    assert [r.devices for r in rows] == [4, 4, 8]


def test_a_resize_step_out_of_order_is_refused_naming_the_transition():
    from slurm_singularity.sched.api import SchedError

    marked = Marks(TAG, resize_to=8, resize_at=5.0, step=ResizeStep.MARKED)
    assert marked.at_step(ResizeStep.SIGNALLED, 6.0).step is ResizeStep.SIGNALLED
    requeued = marked.at_step(ResizeStep.REQUEUED, 7.0)
    for bad_from, bad_to in ((marked, ResizeStep.KILLED), (requeued, ResizeStep.SIGNALLED),
                             (requeued, ResizeStep.REQUEUED)):
        with pytest.raises(SchedError, match=f"{bad_from.step.value} -> {bad_to.value}"):
            bad_from.at_step(bad_to, 9.0)
