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

from slurm_singularity import paths
from slurm_singularity.sched.federation import Member
from slurm_singularity.sched.migrate import (MigrationError, MigrationStep, copy_checkpoint,
                                              migrate, tree_digest)
from slurm_singularity.slurm.cli import CliSlurmClient

BIN = Path(sys.executable).parent
TRAIN = paths.REPO_ROOT / "examples" / "train_lm.py"
FINAL = re.compile(r"final step=(\d+) params_sha256=([0-9a-f]{64})")
STEPS = 30


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


def reference_sha(tmp_path: Path) -> str:
    r = subprocess.run([str(BIN / "singularity-run"), "--devices", "8", "--world-size", "8",
                        "--ckpt-dir", str(tmp_path / "ref"), str(TRAIN), "--steps", str(STEPS)],
                       capture_output=True, text=True, timeout=300)
    m = FINAL.search(r.stdout)
    assert m, r.stdout + r.stderr
    return m.group(2)


def steps_done(out: Path) -> int:
    try:
        found = re.findall(r"^step (\d+) ", out.read_text(), re.M)
    except FileNotFoundError:
        return -1
    return int(found[-1]) if found else -1


@pytest.mark.cluster
def test_a_training_job_migrated_from_east_to_west_ends_as_if_uninterrupted(fed, tmp_path):
    want = reference_sha(tmp_path)
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

    east, west = (Member(n, CliSlurmClient(fed.member(n).env()), fed.member(n).storage_root)
                  for n in ("east", "west"))
    report = migrate(job, east, west, relative, fed.policy.tiers[
        __import__("slurm_singularity.policy.api", fromlist=["Tier"]).Tier.BASIC].signal)
    assert report.steps == tuple(MigrationStep)
    assert report.files > 0 and report.bytes > 0
    assert tree_digest(west.storage_root / relative) == tree_digest(east.storage_root / relative)

    fed.wait_until(lambda: FINAL.search(out.read_text()), "the job's final line", timeout=240)
    text = out.read_text()
    assert "cluster east" in text and "cluster west" in text
    assert text.index("cluster west") > text.index("cluster east")
    assert "restored step" in text.split("cluster west", 1)[1]
    assert FINAL.search(text).group(2) == want
