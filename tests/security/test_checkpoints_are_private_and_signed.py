"""Issue 19, item 7 and the checkpoint-directory part of item 8, shown as
two real unprivileged users (tests/users.py): u1 trains, u2 attacks.

Before: the default checkpoint directory followed the umask, so u2 read
u1's weights; in a shared sticky directory u2 pre-created
``.singularity/ckpt/job-17`` and planted a zeroed model with a recomputed
xxh3 checksum, and u1's job 17 trained from it; a directory that could not
be created or written was found at the first checkpoint, after the work.

The users run ``singularity-run`` (``python -m slurm_singularity.cli.run``)
on examples/train_lm.py with this checkout and the venv's packages on
PYTHONPATH; the venv's interpreter is one every user can run
(scripts/setup.sh).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LM = str(REPO / "examples" / "train_lm.py")
FINAL = re.compile(r"^final step=(\d+) params_sha256=([0-9a-f]{64})", re.M)
JOB = "17"
STEPS = 8


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SINGULARITY_", "SLURM_"))}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), sysconfig.get_paths()["purelib"]])
    return env


def _interpreter(user) -> list[str]:
    """The venv's Python, which every user must be able to run (jobs run as
    their users; scripts/setup.sh makes the venv with /usr/bin/python3)."""
    try:
        r = user.run(sys.executable, "-c", "import torch, slurm_singularity.cli.run",
                     env=_base_env())
        why = r.stderr.strip()[-500:] if r.returncode else ""
    except OSError as exc:
        why = str(exc)
    if why:
        pytest.fail(f"{user.name} cannot run {sys.executable} with this checkout: "
                    f"{why} (run `make setup`, which makes the venv "
                    f"with an interpreter every user can run)")
    return [sys.executable]


@pytest.fixture(scope="module")
def users(unprivileged_users):
    u1, u2 = unprivileged_users
    return u1, u2, _interpreter(u1)


def run_as(user, python: list[str], *args: str, umask: str = "000",
           env: dict[str, str] | None = None, cwd: Path | None = None
           ) -> subprocess.CompletedProcess:
    """``singularity-run ARGS`` as ``user`` under ``umask`` (000: the worst
    a user can have; the runtime must not depend on it)."""
    full = _base_env()
    full.update(env or {})
    return user.run("sh", "-c", f'umask {umask} && exec "$@"', "sh",
                    *python, "-m", "slurm_singularity.cli.run", *args,
                    env=full, cwd=cwd, timeout=300)


def as_job(shared: Path) -> dict[str, str]:
    """The environment of Slurm job 17 submitted from ``shared``: the
    runtime picks ``shared/.singularity/ckpt/job-17``."""
    return {"SLURM_JOB_ID": JOB, "SLURM_SUBMIT_DIR": str(shared)}


def lm(*extra: str) -> list[str]:
    return ["--devices", "1", "--world-size", "2", LM, *extra]


def final(out: str) -> tuple[int, str]:
    match = FINAL.search(out)
    assert match, f"no 'final step=' line in output:\n{out[-2000:]}"
    return int(match.group(1)), match.group(2)


@pytest.fixture
def shared():
    """A shared sticky directory every user may create entries in (a 1777
    scratch directory, as /tmp is)."""
    path = Path(tempfile.mkdtemp(prefix="sing-shared-"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_u2_cannot_read_u1s_checkpoints_whatever_u1s_umask(users, shared):
    u1, u2, python = users
    done = run_as(u1, python, *lm("--steps", "2"), env=as_job(shared))
    assert done.returncode == 0, done.stderr[-3000:]
    job = shared / ".singularity" / "ckpt" / f"job-{JOB}"
    for level in (job.parent.parent, job.parent, job):
        assert (level.stat().st_uid, _mode(level)) == (u1.uid, 0o700), level
    files = list(job.iterdir())
    assert any(f.name == "ckpt-00000002.pt" for f in files)
    assert {(f.name, _mode(f)) for f in files} == {(f.name, 0o600) for f in files}

    read = u2.run("cat", str(job / "ckpt-00000002.pt"))
    listing = u2.run("ls", str(job))
    assert read.returncode != 0 and "Permission denied" in read.stderr
    assert listing.returncode != 0 and "Permission denied" in listing.stderr


@pytest.mark.parametrize("planted", [".singularity", ".singularity/ckpt",
                                     f".singularity/ckpt/job-{JOB}"])
def test_a_checkpoint_path_pre_created_by_u2_in_a_shared_directory_is_refused_before_any_work(
        users, shared, planted):
    u1, u2, python = users
    made = u2.run("sh", "-c", f"umask 000 && mkdir -p {shared / planted}")
    assert made.returncode == 0, made.stderr

    done = run_as(u1, python, *lm("--steps", "2"), env=as_job(shared))
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    refused = shared / planted.split("/")[0]
    assert (f"checkpoint directory {refused} is owned by {u2.name} (uid {u2.uid}), not by you "
            f"({u1.name} (uid {u1.uid}))") in done.stderr
    assert "mode 0777" in done.stderr and "must be owned by the job's user" in done.stderr
    assert "Traceback" not in done.stderr
    assert "step " not in done.stdout            # refused before training
    assert (refused.stat().st_uid, _mode(refused)) == (u2.uid, 0o777)   # not chmod-ed


def test_u1s_own_directory_is_refused_when_others_may_write_it_and_made_private_if_readable(
        users, shared):
    u1, _, python = users
    writable, readable = shared / "writable", shared / "readable"
    assert u1.run("sh", "-c", f"umask 000 && mkdir -m 0777 {writable} && "
                              f"mkdir -m 0755 {readable}").returncode == 0

    refused = run_as(u1, python, "--ckpt-dir", str(writable), *lm("--steps", "1"))
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"checkpoint directory {writable} is writable by group or others" in refused.stderr
    assert "Traceback" not in refused.stderr and "step " not in refused.stdout

    used = run_as(u1, python, "--ckpt-dir", str(readable), *lm("--steps", "1"))
    assert used.returncode == 0, used.stderr[-3000:]
    assert _mode(readable) == 0o700
    assert f"checkpoint directory {readable} was mode 0755; made private (0700)" in used.stderr


def test_a_checkpoint_directory_that_cannot_be_created_or_written_fails_at_start_with_exit_2(
        users, shared):
    u1, _, python = users
    roots = shared / "roots"
    roots.mkdir(mode=0o755)                       # root's: u1 cannot create in it
    mine = shared / "mine"
    assert u1.run("mkdir", "-m", "0500", str(mine)).returncode == 0   # u1's, read-only

    uncreatable = run_as(u1, python, "--ckpt-dir", str(roots / "job"), *lm("--steps", "1"))
    unwritable = run_as(u1, python, "--ckpt-dir", str(mine), *lm("--steps", "1"))

    assert uncreatable.returncode == 2, uncreatable.stderr[-3000:]
    assert (f"singularity-run: error: cannot create checkpoint directory {roots / 'job'}: "
            "Permission denied") in uncreatable.stderr
    assert unwritable.returncode == 2, unwritable.stderr[-3000:]
    assert (f"singularity-run: error: checkpoint directory {mine} cannot be written: "
            "Permission denied") in unwritable.stderr
    for done in (uncreatable, unwritable):
        assert "Traceback" not in done.stderr and "step " not in done.stdout


PLANT = r"""
import sys, xxhash
from slurm_singularity.runtime import checkpoint, stateformat
src, out03, out04 = sys.argv[1:]
step, state = checkpoint.load_latest(src)
for tensor in state["model"].values():
    tensor.zero_()                      # the attacker's model
state["step"] = 6
encoded = stateformat.encode(state)
payload = encoded.head + b"".join(bytes(b) for b in encoded.buffers)
with open(out03, "wb") as fh:           # the old attack: format 03, checksum recomputed
    fh.write(b"SSCKPT03\n" + payload + xxhash.xxh3_128(payload).hexdigest().encode()
             + f"{len(payload):016d}".encode() + b"\n" + checkpoint.END)
try:
    signed = checkpoint.serialize(state, step=6)
except TypeError:                       # a runtime from before signatures
    signed = checkpoint.serialize(state)
with open(out04, "wb") as fh:           # the current format, signed with u2's own key
    fh.write(signed)
"""


@pytest.fixture(scope="module")
def u1_reference(users) -> tuple[int, str]:
    """u1's uninterrupted run of STEPS steps."""
    u1, _, python = users
    ckpt = u1.home / f"ckpt-reference-{uuid.uuid4().hex[:8]}"
    done = run_as(u1, python, "--ckpt-dir", str(ckpt), *lm("--steps", str(STEPS)))
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.rmtree(ckpt, ignore_errors=True)
    return final(done.stdout)


@pytest.fixture(scope="module")
def planted_files(users, tmp_path_factory) -> dict[str, Path]:
    """u2's planted checkpoints of step 6 (zeroed model) for a job of u1's
    shape, made from u2's own run, readable by u1 in a shared directory."""
    _, u2, python = users
    drop = Path(tempfile.mkdtemp(prefix="sing-drop-"))
    drop.chmod(0o1777)
    own = u2.home / f"ckpt-plant-{uuid.uuid4().hex[:8]}"
    done = run_as(u2, python, "--ckpt-dir", str(own), *lm("--steps", "2"), umask="022")
    assert done.returncode == 0, done.stderr[-3000:]
    out = {"format 03, xxh3 recomputed": drop / "planted-03.pt",
           "format 04, signed with u2's key": drop / "planted-04.pt"}
    made = u2.run(*python, "-c", PLANT, str(own), *map(str, out.values()),
                  env=_base_env() | {"SINGULARITY_CKPT_ACCEPT_UNSIGNED": "0"})
    assert made.returncode == 0, made.stderr[-3000:]
    for path in out.values():
        path.chmod(0o644)
    yield out
    shutil.rmtree(drop, ignore_errors=True)
    shutil.rmtree(own, ignore_errors=True)


@pytest.mark.parametrize("kind,message", [
    ("format 03, xxh3 recomputed", "is unsigned (format 03, written before checkpoints were "
                                   "signed), so it cannot be told apart from a planted one"),
    ("format 04, signed with u2's key", "is not signed with your checkpoint key"),
])
def test_a_checkpoint_planted_by_u2_is_refused_on_restore_and_u1s_previous_one_used(
        users, u1_reference, planted_files, kind, message):
    """However the file got into u1's directory (here u1 copies it, as from
    a share; the directory's privacy stops u2 doing it himself), restore
    refuses it and u1's own checkpoint of step 4 is used: the run ends with
    the parameters of u1's uninterrupted run."""
    u1, _, python = users
    ckpt = u1.home / f"ckpt-victim-{uuid.uuid4().hex[:8]}"
    try:
        first = run_as(u1, python, "--ckpt-dir", str(ckpt), *lm("--steps", "4"))
        assert first.returncode == 0, first.stderr[-3000:]
        planted = ckpt / "ckpt-00000006.pt"
        assert u1.run("cp", str(planted_files[kind]), str(planted)).returncode == 0

        resumed = run_as(u1, python, "--ckpt-dir", str(ckpt), *lm("--steps", str(STEPS)))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"checkpoint {planted} {message}" in resumed.stderr
        assert "refusing it" in resumed.stderr
        assert "using the previous checkpoint ckpt-00000004.pt instead" in resumed.stderr
        assert "restored step 4" in resumed.stderr
        assert final(resumed.stdout) == u1_reference
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
