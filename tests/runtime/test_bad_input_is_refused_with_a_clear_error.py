"""Invariant 6 for the runtime: wrong arguments and malformed files get a
clear error naming what is wrong; nothing crashes."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from slurm_singularity.runtime.api import HistoryRecord, JobShape, RuntimeSetupError, StopReason
from slurm_singularity.runtime.data import Cursor, RankShard
from slurm_singularity.runtime.history import append_record, read_history
from slurm_singularity.runtime.job import Job

import runtime_harness as harness


@pytest.mark.parametrize("argv, message", [
    (["--devices", "3", "--world-size", "8", "--ckpt-dir", "{tmp}", harness.LM],
     "--world-size 8 is not a multiple of the 3 devices"),
    (["--devices", "0", "--ckpt-dir", "{tmp}", harness.LM],
     "--devices 0: must be between 1 and 1024"),
    (["--devices", "100000", "--ckpt-dir", "{tmp}", harness.LM],
     "--devices 100000: must be between 1 and 1024"),
    (["--world-size", str(10 ** 12), "--ckpt-dir", "{tmp}", harness.LM],
     f"--world-size {10 ** 12}: must be between 1 and {1 << 20}"),
    (["--ckpt-every-s", "nan", "--ckpt-dir", "{tmp}", harness.LM],
     "--ckpt-every-s nan: must be a number between 0 and 604800"),
    (["--ckpt-every-s", "inf", "--ckpt-dir", "{tmp}", harness.LM], "--ckpt-every-s inf"),
    (["--ckpt-every-s", "-1", "--ckpt-dir", "{tmp}", harness.LM], "--ckpt-every-s -1.0"),
    (["--ckpt-dir", "{tmp}", "no/such/script.py"], "does not exist"),
    (["--ckpt-dir", "{tmp}"], "missing the training script"),
    ([harness.LM], "--ckpt-dir is required outside Slurm"),
])
def test_singularity_run_refuses_bad_arguments_with_exit_2(tmp_path, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    done = subprocess.run([harness.RUN, *argv], env=harness._env(None), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "singularity-run: error:" in done.stderr and message in done.stderr


@pytest.mark.parametrize("name, value", [
    ("SINGULARITY_CKPT_EVERY_S", "inf"), ("SINGULARITY_CKPT_EVERY_S", "1e300"),
    ("SINGULARITY_WORLD_SIZE", str(10 ** 12)),
])
def test_contract_variables_out_of_range_are_refused_naming_them(tmp_path, name, value):
    env = {**harness._env(None), name: value}
    done = subprocess.run([harness.RUN, "--ckpt-dir", str(tmp_path), harness.LM],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"{name}={value!r} must be" in done.stderr


def test_a_job_shape_names_the_bad_field():
    with pytest.raises(RuntimeSetupError, match="W=6 is not a multiple of devices D=4"):
        JobShape(6, 4)
    with pytest.raises(RuntimeSetupError, match="devices D=0"):
        JobShape(8, 0)
    assert list(JobShape(8, 4, 2).logical_ranks) == [4, 5]


def test_a_resumed_data_cursor_reads_exactly_the_samples_an_unbroken_one_reads():
    data = torch.utils.data.TensorDataset(torch.arange(50))
    unbroken = RankShard(data, 1, 4, 3, seed=5)
    batches = [unbroken.next_batch()[0].tolist() for _ in range(10)]   # crosses epochs
    resumed = RankShard(data, 1, 4, 3, seed=5)
    for _ in range(6):
        resumed.next_batch()
    again = RankShard(data, 1, 4, 3, seed=5,
                      cursor=Cursor.from_list(resumed.cursor.to_list()))
    assert [again.next_batch()[0].tolist() for _ in range(4)] == batches[6:]


def test_a_loop_body_that_skips_logical_ranks_is_an_error(tmp_path):
    job = Job(shape=JobShape(4, 1), device=torch.device("cpu"), deterministic=True,
              ckpt_dir=None)
    model = torch.nn.Linear(2, 1)
    data = torch.utils.data.TensorDataset(torch.randn(64, 2), torch.randn(64, 1))
    trainer = job.trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data,
                          batch_size=2)
    with pytest.raises(RuntimeError, match="ran 0 of 4 logical ranks; iterate step.batches"):
        for step in trainer.steps(2):
            for x, y in step.batches():
                ((model(x) - y) ** 2).mean().backward()
                break


def test_a_checkpoint_of_another_world_size_is_refused(tmp_path):
    def trainer(world):
        job = Job(shape=JobShape(world, 1), device=torch.device("cpu"), deterministic=True,
                  ckpt_dir=tmp_path)
        model = torch.nn.Linear(2, 1)
        data = torch.utils.data.TensorDataset(torch.randn(64, 2), torch.randn(64, 1))
        return job.trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data,
                           batch_size=2), model

    first, model = trainer(4)
    for step in first.steps(1):
        for x, y in step.batches():
            ((model(x) - y) ** 2).mean().backward()
    with pytest.raises(RuntimeSetupError, match="world size W=4, this job has W=2"):
        trainer(2)


def test_a_malformed_history_line_is_reported_with_its_line_number(tmp_path):
    record = HistoryRecord(start_time=1.0, end_time=2.0, devices=2, world_size=8,
                           first_step=0, last_step=5, stop=StopReason.PREEMPTED,
                           checkpoint_written=True, steps_lost=0, exit_code=75)
    append_record(tmp_path, record)
    assert read_history(tmp_path) == [record]
    with open(tmp_path / "history.jsonl", "a") as fh:
        fh.write(json.dumps({"start_time": 1}) + "\n")
    with pytest.raises(ValueError, match=r"history.jsonl:2: .*lacks field 'end_time'"):
        read_history(tmp_path)
