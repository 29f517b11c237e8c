"""Migration of a running job between the clusters of a real federation:
a basic training job (examples/train_lm.py, W=8) on east is checkpointed,
requeued held, narrowed to west, its checkpoint copied (atomically,
verified) to west's storage root and released; it resumes on west and ends
with the params_sha256 of an uninterrupted run. The copy is checked apart."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.test_preemption import BIN, FINAL, TRAIN, reference_sha, steps_done
from slurm_singularity.sched.federation import federated_checkpoint_dir
from slurm_singularity.sched.migrate import (InFlight, MigrationError, MigrationJournal,
                                              MigrationStep, copy_checkpoint, tree_digest)

STEPS = 30
ADMIN = [sys.executable, "-m", "slurm_singularity.cli.admin"]


def test_a_checkpoint_copy_is_whole_verified_and_replaces_an_older_one(tmp_path):
    src = tmp_path / "src" / "job-7"
    (src / "step-10").mkdir(parents=True)
    (src / "step-10" / "params.pt").write_bytes(b"x" * 100_000)
    (src / "history.jsonl").write_text('{"step": 10}\n')
    dst = tmp_path / "dst" / "job-7"
    (dst / "step-4").mkdir(parents=True)
    (dst / "step-4" / "params.pt").write_bytes(b"old")
    files, size = copy_checkpoint(src, dst)
    assert (files, size) == (2, 100_000 + len('{"step": 10}\n'))
    assert tree_digest(dst) == tree_digest(src)
    assert not (dst / "step-4").exists()
    assert [p.name for p in dst.parent.iterdir()] == ["job-7"]     # no temporary left


def test_a_copy_left_half_done_by_a_killed_copier_is_cleared_and_made_whole(tmp_path):
    src = tmp_path / "src" / "job-7"
    src.mkdir(parents=True)
    (src / "params.pt").write_bytes(b"p" * 5000)
    dst = tmp_path / "dst" / "job-7"
    (dst.parent / ".job-7.copy-4242").mkdir(parents=True)          # killed mid-copy
    (dst.parent / ".job-7.copy-4242" / "params.pt").write_bytes(b"p" * 10)
    (dst.parent / ".job-7.old-4242").mkdir()                          # killed mid-rename
    assert copy_checkpoint(src, dst) == (1, 5000)
    assert tree_digest(dst) == tree_digest(src)
    assert [p.name for p in dst.parent.iterdir()] == ["job-7"]


def test_migration_steps_are_recorded_one_by_one_so_a_failed_copy_leaves_the_job_narrowed(
        tmp_path):
    from types import SimpleNamespace

    from slurm_singularity.sched.federation import Member
    from slurm_singularity.sched.migrate import advance
    from slurm_singularity.slurm.api import Job

    calls = []
    client = SimpleNamespace(
        jobs=lambda: [Job(7, "j", "PENDING", "basic", "a", "u", "", reason="BeginTime")],
        scontrol=lambda *a: calls.append(a) or "")
    east, west = (Member(n, client, tmp_path / n) for n in ("east", "west"))
    recorded = []
    entry = InFlight(7, "east", "west", "ckpt/job-7", MigrationStep.SIGNALLED, 0.0)
    with pytest.raises(MigrationError, match="no checkpoint in"):
        advance(entry, east, west, record=recorded.append)
    assert [e.step for e in recorded] == [MigrationStep.REQUEUED, MigrationStep.NARROWED]
    assert calls == [("hold", "7"), ("update", "JobId=7", "Clusters=west")]


def test_an_empty_checkpoint_is_not_copied_and_the_destination_is_untouched(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(MigrationError, match="no checkpoint in"):
        copy_checkpoint(tmp_path / "src", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


@pytest.mark.cluster
def test_a_training_job_migrated_from_east_to_west_ends_as_if_uninterrupted(fed, tmp_path):
    want = reference_sha(tmp_path, STEPS)   # on 2 devices: the result does not depend on D
    root = fed.spec.state_dir
    relative = Path("ckpt") / "train"
    script = tmp_path / "train.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --sla=basic --elastic=8:8 --world-size=8 -N1 --gres=gpu:8
export SINGULARITY_CKPT_DIR={root}/$SLURM_CLUSTER_NAME/storage/{relative}
echo "cluster $SLURM_CLUSTER_NAME"
srun --ntasks-per-node=1 {BIN / 'singularity-run'} {TRAIN} --steps {STEPS} --step-sleep 0.3
""")
    out = tmp_path / "train.out"
    r = fed.run("east", "sbatch", "--parsable", "--clusters=east", "-o", str(out),
                "--open-mode=append", str(script))
    job = int(r.stdout.strip().split(";")[0])
    fed.wait_until(lambda: steps_done(out) >= 6, "step 6 on east", timeout=180)

    r = subprocess.run([*ADMIN, "cluster", "migrate", "--state-dir", str(root), str(job),
                        "--to", "west", "--ckpt", str(relative)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    print(r.stdout)         # the migration time, for docs/benchmarks
    assert re.match(rf"job {job} moved east -> west in [0-9.]+ s \(\d+ checkpoint files", r.stdout)
    assert "copied its checkpoint" in r.stderr and "verified" in r.stderr
    east, west = fed.member("east").storage_root, fed.member("west").storage_root
    assert tree_digest(west / relative) == tree_digest(east / relative)

    fed.wait_until(lambda: FINAL.search(out.read_text()), "the job's final line", timeout=240)
    text = out.read_text()
    assert "cluster east" in text and "cluster west" in text
    assert text.index("cluster west") > text.index("cluster east")
    assert "restored step" in text.split("cluster west", 1)[1]
    assert FINAL.search(text).group(2) == want


def test_migrate_refuses_a_checkpoint_path_outside_the_storage_root_naming_it(tmp_path):
    for bad in ("/abs/ckpt", "../elsewhere"):
        r = subprocess.run([*ADMIN, "cluster", "migrate", "--state-dir", str(tmp_path), "7",
                            "--to", "west", "--ckpt", bad], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 1
        assert f"error: --ckpt {bad} must be relative to the storage root" in r.stderr


def placer(fed, *extra: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "slurm_singularity.cli.schedd", "--federation",
                        str(fed.spec.state_dir), *extra], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.cluster
def test_a_placer_killed_mid_migration_finishes_it_once_without_losing_the_checkpoint(fed):
    """The state a placer leaves when killed right after it held the job:
    its journal says REQUEUED, the job is held on east, the checkpoint is in
    east's storage only. The next placer narrows, copies and releases."""
    root = fed.spec.state_dir
    east, west = fed.member("east").storage_root, fed.member("west").storage_root
    job = submit_held(fed, root)
    relative = federated_checkpoint_dir(job)
    (east / relative).mkdir(parents=True)
    (east / relative / "step").write_text("step 12\n")
    journal = root / "migrations.json"
    MigrationJournal(journal).put(InFlight(job, "east", "west", str(relative),
                                           MigrationStep.REQUEUED, time.time()))
    r = placer(fed, "--once")
    assert f"[job {job}] migrated east -> west" in r.stderr
    assert (west / relative / "step").read_text() == "step 12\n"
    assert (east / relative / "step").read_text() == "step 12\n"      # the source is kept
    assert MigrationJournal(journal).load() == {}
    out = root / f"out-{job}"
    fed.wait_until(lambda: out.exists() and out.read_text(), "the job's output")
    assert out.read_text().split() == ["west", "step", "12"]
    again = placer(fed, "--once")
    assert f"[job {job}]" not in again.stderr                          # no second move


def submit_held(fed, root: Path) -> int:
    script = f"""#!/bin/bash
echo $SLURM_CLUSTER_NAME
cat {root}/$SLURM_CLUSTER_NAME/storage/ckpt/job-$SLURM_JOB_ID/step
"""
    r = fed.run("east", "sbatch", "--parsable", "-H", "--gres=gpu:2", "-o", f"{root}/out-%j",
                input_script(root, script))
    return int(r.stdout.strip().split(";")[0])


def input_script(root: Path, text: str) -> str:
    path = root / f"job-{time.monotonic_ns()}.sh"
    path.write_text(text)
    return str(path)


@pytest.mark.cluster
def test_a_preempted_training_job_is_moved_to_the_cluster_with_room_and_resumes_there(fed,
                                                                                      tmp_path):
    """A premium job that must run on east preempts a basic training job
    there (Slurm's own preemption: checkpoint, requeue); the placer copies
    its checkpoint to west and releases it there instead of letting it wait
    for east or start over on west."""
    want = reference_sha(tmp_path, STEPS)
    root = fed.spec.state_dir
    out = tmp_path / "train.out"
    script = tmp_path / "train.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --sla=basic --elastic=8:8 --world-size=8 -N1 --gres=gpu:8
export SINGULARITY_CKPT_DIR={root}/$SLURM_CLUSTER_NAME/storage/ckpt/job-$SLURM_JOB_ID
echo "cluster $SLURM_CLUSTER_NAME"
srun --ntasks-per-node=1 {BIN / 'singularity-run'} {TRAIN} --steps {STEPS} --step-sleep 0.3
""")
    # west is busy while the job is submitted, so it starts on east
    busy = fed.run("west", "sbatch", "--parsable", "--clusters=west", "-N2", "--gres=gpu:8",
                   "-o", "/dev/null", "--wrap", "sleep 600").stdout.strip().split(";")[0]
    job = int(fed.run("east", "sbatch", "--parsable", "-o", str(out), "--open-mode=append",
                      str(script)).stdout.strip().split(";")[0])
    fed.wait_until(lambda: steps_done(out) >= 6, "step 6 on east", timeout=180)
    assert "cluster east" in out.read_text()
    fed.run("west", "scancel", busy)
    daemon = subprocess.Popen([sys.executable, "-m", "slurm_singularity.cli.schedd",
                               "--federation", str(root), "--period", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        fed.run("east", "sbatch", "--clusters=east", "--sla=premium", "--account=research",
                "-N2", "--gres=gpu:8", "-o", "/dev/null", "--wrap", "sleep 60")
        fed.wait_until(lambda: FINAL.search(out.read_text()), "the job's final line", timeout=300)
    finally:
        daemon.terminate()
        log = daemon.communicate(timeout=30)[0]
    text = out.read_text()
    assert f"[job {job}] migrating east -> west" in log, log[-3000:]
    assert f"[job {job}] migrated east -> west" in log
    after = text.split("cluster west", 1)[1]
    assert "restored step" in after, text[-2000:]
    assert FINAL.search(text).group(2) == want
