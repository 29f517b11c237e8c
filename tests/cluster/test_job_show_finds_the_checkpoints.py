"""`singularity-admin job show` finds a job's checkpoints where the job put
them (an ``#SBATCH --ckpt-dir`` line, ``SINGULARITY_CKPT_DIR`` in its script,
``--ckpt-dir`` on sbatch's command line) without being told, and says the
lost work is unknown, not 0, when it has no runtime history to count it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_singularity import paths
from slurm_singularity.cli import admin, admin_job
from slurm_singularity.cli.admin_job import RunRow, ckpt_dir_candidates, total_lost
from slurm_singularity.slurm.api import JobRun, SlurmError

BIN = Path(sys.executable).parent
TRAIN = paths.REPO_ROOT / "examples" / "train_lm.py"


def test_the_candidates_follow_the_runtimes_own_order_of_precedence():
    script = ("#!/bin/bash\n"
              "#SBATCH -N1 --ckpt-dir=/ck/sbatch\n"
              "export SINGULARITY_CKPT_DIR='/ck/exported dir'\n"
              "srun singularity-run --ckpt-dir /ck/run train.py --steps 3\n")
    found = ckpt_dir_candidates(7, submit_line="sbatch --ckpt-dir /ck/submit job.sh",
                                script=script, work_dir="/home/u")
    assert [d for d, _ in found] == ["/ck/run", "/ck/exported dir", "/ck/submit", "/ck/sbatch",
                                     "/home/u/.singularity/ckpt/job-7"]
    assert found[3][1] == "#SBATCH --ckpt-dir (script line 2)"


def test_a_script_that_names_no_directory_leaves_only_the_default():
    assert ckpt_dir_candidates(3, script="#!/bin/sh\nsleep 1 # --ckpt-dir /nope\n",
                               work_dir="/w") == [
        ("/w/.singularity/ckpt/job-3", "the runtime's default under the submit directory")]


def _row(run: int, stopped: str, lost: int | None) -> RunRow:
    return RunRow(run=run, start="?", end="?", devices=None, steps="?", stopped=stopped,
                  checkpoint="?", steps_lost=lost, time_lost_s=None, slurm_state="?")


def test_the_total_is_unknown_when_an_interrupted_run_has_no_count():
    assert total_lost([_row(1, "preempted", 0), _row(2, "finished", 0)]) == 0
    assert total_lost([_row(1, "preempted", None), _row(2, "finished", None)]) is None
    assert total_lost([_row(1, "finished", None)]) == 0


class _NoHistorySlurm:
    """sacct knows a requeued job; nothing says where its checkpoints are."""

    def __init__(self, *_a, **_k) -> None:
        pass

    def job_runs(self, job_id):
        return [JobRun(job_id, "2026-01-01T00:00:00", "2026-01-01T00:01:00", 60, "REQUEUED",
                       "0:15", "n1", 8, "batch", "/nonexistent/submit"),
                JobRun(job_id, "2026-01-01T00:01:30", "2026-01-01T00:02:00", 30, "COMPLETED",
                       "0:0", "n1", 8, "batch", "/nonexistent/submit")]

    def submit_line(self, job_id):
        return ""

    def batch_script(self, job_id):
        raise SlurmError(["scontrol"], 1, "Invalid job id specified")


def test_job_show_says_unknown_not_zero_lost_for_a_requeued_job_without_history(
        monkeypatch, capsys):
    monkeypatch.setattr("slurm_singularity.slurm.cli.CliSlurmClient", _NoHistorySlurm)
    assert admin.main(["job", "show", "41"]) == 0
    out = capsys.readouterr().out
    assert "steps lost in all: unknown (run(s) 1 recorded no step count)" in out
    assert "steps lost in all: 0" not in out
    assert "no runtime history in /nonexistent/submit/.singularity/ckpt/job-41" in out
    assert admin.main(["job", "show", "41", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps_lost_total"] is None


def _submit(cluster, tmp_path: Path, how: str) -> tuple[int, Path]:
    ckpt = tmp_path / f"ckpt-{how}"
    sbatch_line = f"#SBATCH --ckpt-dir={ckpt}" if how == "sbatch-line" else ""
    export = f"export SINGULARITY_CKPT_DIR={ckpt}" if how == "script-env" else ""
    script = tmp_path / "train.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --sla=basic --world-size=2 -N1 --gres=gpu:2
{sbatch_line}
{export}
srun --ntasks-per-node=1 {BIN / 'singularity-run'} {TRAIN} --steps 3
""")
    extra = [f"--ckpt-dir={ckpt}"] if how == "submit-line" else []
    r = cluster.run("sbatch", "--parsable", *extra, "-o", str(tmp_path / "out"), str(script),
                    check=True, cwd=tmp_path)
    return int(r.stdout.strip()), ckpt


@pytest.mark.cluster
@pytest.mark.parametrize("how", ["sbatch-line", "script-env", "submit-line"])
def test_job_show_finds_the_history_where_the_job_put_its_checkpoints(
        slurm_cluster, tmp_path, how):
    job, ckpt = _submit(slurm_cluster, tmp_path, how)
    rec = slurm_cluster.wait_job(job, timeout=180)
    assert rec["JobState"] == "COMPLETED", (rec, (tmp_path / "out").read_text())
    assert (ckpt / "history.jsonl").is_file()
    deadline = time.monotonic() + 30
    while True:     # accounting records the end a moment after slurmctld
        show = subprocess.run([str(BIN / "singularity-admin"), "job", "show", str(job),
                               "--json"], env=slurm_cluster.env, capture_output=True, text=True,
                              timeout=60)
        data = json.loads(show.stdout) if show.returncode == 0 else {}
        if data.get("runs") and data["runs"][-1]["slurm_state"] == "COMPLETED" \
                or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert data["ckpt_dir"] == str(ckpt), (data, show.stderr)
    assert [r["stopped"] for r in data["runs"]] == ["finished"]
    assert data["runs"][0]["steps"] == "0..3"
    assert data["steps_lost_total"] == 0
