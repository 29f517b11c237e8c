"""One reader of Slurm's GRES and TRES spellings (``slurm/gres.py``), on
every spelling Slurm 22.05 prints, and the typed job records built from
squeue's and sacct's output with it (text copied from the local cluster,
so that odd cases run without one)."""

from __future__ import annotations

import pytest

from slurm_singularity.slurm import gres
from slurm_singularity.slurm.api import Job, SlurmOutputError, SlurmState
from slurm_singularity.slurm.cli import _job, parse_sacct_run

#: (text, GPUs, where Slurm 22.05 prints it)
SPELLINGS = [
    ("gpu:8", 8, "sinfo gres"),
    ("gpu:8(S:0-1)", 8, "sinfo gres with the sockets the GPUs are bound to"),
    ("gpu:a100:4(S:0-1)", 4, "sinfo gres, typed"),
    ("gpu:a100:4(S:0-1),gpu:v100:2(S:1)", 6, "sinfo gres, two types"),
    ("gpu:2(IDX:0-1)", 2, "squeue gres_detail"),
    ("gpu:a100:2(IDX:0,3)", 2, "squeue gres_detail, typed, indices with a comma"),
    ("gpu(IDX:0)", 1, "squeue gres_detail without a count"),
    ("gres:gpu:2", 2, "squeue tres_per_node (22.05)"),
    ("gres/gpu:2", 2, "squeue tres_per_node (later releases)"),
    ("gres:gpu:a100:2", 2, "squeue tres_per_node, typed"),
    ("gres:gpu", 1, "a request without a count"),
    ("gres:gpu:", 1, "a request with an empty count"),
    ("gres:gpu:a100:2,gres:gpu:v100:1", 3, "a request of two types"),
    ("gres/gpu=2", 2, "tres_req_str / AllocTRES entry"),
    ("gres/gpu:a100=2", 2, "a typed TRES entry alone"),
    ("cpu=4,mem=250G,node=2,billing=4,gres/gpu=16", 16, "squeue tres_req_str"),
    ("billing=8,cpu=8,gres/gpu=4,gres/gpu:a100=4,mem=8G,node=1", 4,
     "sacct AllocTRES: the typed entry is a breakdown, not more GPUs"),
    ("cpu=1,gres/gpu:a100=2,gres/gpu:v100=1", 3, "typed TRES entries without a total"),
    ("gpu:8(S:0-1),mps:400(S:0-1)", 8, "sinfo gres with MPS shares"),
    ("gres:mps:100", 0, "MPS shares are no GPUs"),
    ("craynetwork:1", 0, "another GRES"),
    ("N/A", 0, "squeue: no GRES"),
    ("(null)", 0, "sinfo: no GRES"),
    ("", 0, "empty"),
    (None, 0, "absent"),
    ("cpu=1,mem=1G,node=1,billing=1", 0, "TRES without GPUs"),
]


@pytest.mark.parametrize("text, gpus, where", SPELLINGS)
def test_every_gres_spelling_of_slurm_22_05_gives_its_gpu_count(text, gpus, where):
    assert gres.gpus(text) == gpus, where


def test_a_request_the_executor_writes_reads_back_as_its_count():
    assert gres.request(6) == "gres:gpu:6" and gres.gpus(gres.request(6)) == 6


def test_an_entry_keeps_its_type_sockets_and_indices():
    assert gres.parse("gpu:a100:4(S:0-1)") == (gres.Gres("gpu", "a100", 4, sockets="0-1"),)
    assert gres.parse("gpu:a100:2(S:0,IDX:0,3)") == (
        gres.Gres("gpu", "a100", 2, sockets="0", indices="0,3"),)
    assert gres.parse("mps:1K") == (gres.Gres("mps", None, 1024),)


@pytest.mark.parametrize("text", ["gres/gpu=two", "gpu:2(S:0-1", ":2", "gres/gpu=-1"])
def test_a_spelling_it_cannot_read_is_an_error_naming_the_field_and_entry(text):
    with pytest.raises(SlurmOutputError) as err:
        gres.gpus(text, "squeue tres_per_node")
    assert str(err.value).startswith("squeue tres_per_node: cannot read ")
    assert text.split(",")[0] in str(err.value)


def _squeue_job(**fields) -> dict:
    return {"job_id": 7, "name": "train", "job_state": "RUNNING", "partition": "basic",
            "account": "default", "user_name": "u1", "nodes": "n[1-2]",
            "admin_comment": "singularity:sla=basic,elastic=8:16,ws=16", **fields}


def test_a_running_jobs_record_has_its_state_placement_and_requested_and_allocated_gpus():
    job = _job(_squeue_job(
        node_count=2, tres_per_node="gres:gpu:8",
        tres_req_str="cpu=2,mem=2G,node=2,billing=2,gres/gpu=16",
        gres_detail=["gpu:8(IDX:0-7)", "gpu:a100:8(IDX:0-7)"],
        job_resources={"allocated_nodes": [{"nodename": "n1"}, {"nodename": "n2"}]},
        start_time=1_800_000_000, submit_time=1_799_999_990))
    assert job.state is SlurmState.RUNNING and job.state.running and not job.state.pending
    assert (job.gpus, job.placement, job.allocated_gpus) == (16, (("n1", 8), ("n2", 8)), 16)
    assert (job.start_time, job.submit_time) == (1_800_000_000.0, 1_799_999_990.0)


def test_a_requeued_jobs_requested_gpus_come_from_its_tres_request_not_its_stale_node_count():
    # squeue --json of a job requeued from 4 nodes and set to 2 x 8 GPUs
    job = _job(_squeue_job(job_state="PENDING", node_count=4, tres_per_node="gres:gpu:8",
                           tres_req_str="cpu=4,mem=250G,node=2,billing=4,gres/gpu=16"))
    assert job.state.pending and (job.gpus, job.placement) == (16, ())
    plain = _job(_squeue_job(job_state="PENDING", node_count=2, tres_per_node="gres:gpu:3"))
    assert plain.gpus == 6
    per_job = _job(_squeue_job(job_state="PENDING", node_count=3, tres_per_job="gres:gpu:5"))
    assert per_job.gpus == 5


def test_a_job_whose_gres_cannot_be_read_is_a_job_without_gpus_and_a_warning(caplog):
    job = _job(_squeue_job(job_state="PENDING", tres_per_node="gres/gpu:8(S:0"))
    assert job.gpus == 0
    assert "[job 7]" in caplog.text and "squeue tres_per_node" in caplog.text


def test_a_state_slurm_adds_later_is_unknown_not_a_crash():
    assert SlurmState.parse("CANCELLED by 0") is SlurmState.CANCELLED
    assert SlurmState.parse("SOMETHING_NEW") is SlurmState.UNKNOWN
    assert Job(1, "j", "REQUEUE_HOLD", "p", "a", "u", "").state is SlurmState.REQUEUE_HOLD


def test_sacct_lines_become_runs_with_their_gpus():
    run = parse_sacct_run("11|2026-11-26T21:58:09|2026-11-26T21:58:15|6|REQUEUED|75:0|n1|"
                          "billing=1,cpu=1,gres/gpu=4,gres/gpu:a100=4,node=1|basic|/work")
    assert (run.job_id, run.state, run.exit_code, run.gpus, run.elapsed_s) == \
        (11, SlurmState.REQUEUED, "75:0", 4, 6)
    cancelled = parse_sacct_run("12|2026-11-26T21:58:09|Unknown|0|CANCELLED by 0|0:0|n1||basic|/w")
    assert cancelled.state == "CANCELLED" and cancelled.gpus == 0
