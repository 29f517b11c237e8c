"""Migration of a running job between the clusters of a real federation:
a basic training job (examples/train_lm.py, W=8) on east is checkpointed,
requeued held, narrowed to west, its checkpoint copied (atomically,
verified) to west's storage root and released; it resumes on west and ends
with the params_sha256 of an uninterrupted run. The copy is checked apart."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.test_preemption import BIN, FINAL, TRAIN, reference_sha, steps_done
from slurm_singularity.sched.migrate import MigrationError, copy_checkpoint, tree_digest

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
