"""Training shapes (issue 17 items 1 and 2): a GAN (two models, two
optimizers in alternating passes, an EMA and a dict of counters as user
state), fp16 with GradScaler, LBFGS through a closure, and gradient
accumulation give the same bits on D = 1, 2 and 4, also when preempted and
restored at another D; user state comes back after every requeue."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from slurm_singularity import contract
from slurm_singularity.runtime import checkpoint

import runtime_harness as harness

REPO = Path(__file__).resolve().parents[2]
GAN = str(REPO / "examples" / "train_gan.py")
AMP = str(REPO / "examples" / "train_amp.py")
SHAPES = str(Path(__file__).with_name("shapes_script.py"))
W = 4
STEPS = 8


def _final(out: str, script: str) -> str:
    """The whole final line, less the run id (random per job)."""
    match = re.search(r"^final step=.*$", out, re.M)
    assert match, f"{script}: no final line in\n{out[-2000:]}"
    return re.sub(r" run_id=\S+", "", match.group(0))


def _chain(script: str, ckpt: Path, *args: str) -> tuple[str, str]:
    """Preempted on D=2, then on D=4, finished on D=1: (final line, stdout of all)."""
    outs = []
    restored = 0
    for devices in (2, 4):
        code, seen, out, err = harness.run_and_preempt(script, ckpt, devices, W, restored + 1,
                                                       *args, "--step-sleep", "0.2")
        assert code == contract.REQUEUE_EXIT_CODE, err[-3000:]
        newest = checkpoint.list_meta(ckpt)[0]
        assert restored < newest.step < STEPS, (restored, newest.step)
        restored = newest.step
        outs.append(out)
    done = harness.run(script, ckpt, 1, W, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"restored step {restored}" in done.stderr
    outs.append(done.stdout)
    return _final(done.stdout, script), "".join(outs)


@pytest.mark.parametrize("script", [GAN, AMP], ids=["gan", "grad-scaler"])
def test_gan_and_grad_scaler_runs_are_bitwise_equal_on_any_d_across_preemptions(tmp_path,
                                                                                 script):
    args = ("--steps", str(STEPS))
    reference = harness.run(script, tmp_path / "d1", 1, W, *args)
    assert reference.returncode == 0, reference.stderr[-3000:]
    want = _final(reference.stdout, script)
    four = harness.run(script, tmp_path / "d4", 4, W, *args)
    assert four.returncode == 0, four.stderr[-3000:]
    assert _final(four.stdout, script) == want
    got, out = _chain(script, tmp_path / "chain", *args)
    assert got == want
    if script == GAN:       # the run id drawn at the first start survives every requeue
        ids = set(re.findall(r"^run_id (\w+)", out, re.M))
        assert len(ids) == 1, ids
    else:                   # the scale overflowed, backed off and grew again
        scales = [float(s) for s in re.findall(r"^step \d+ scale (\S+)", reference.stdout, re.M)]
        assert scales[0] < 2.0**24 and max(scales[1:]) > min(scales), scales


@pytest.mark.parametrize("shape", ["lbfgs", "accumulate"])
def test_closures_and_accumulation_are_bitwise_equal_on_any_d(tmp_path, shape):
    args = ("--shape", shape, "--steps", "4")
    finals = set()
    losses = set()
    for devices in (1, 2, 4):
        done = harness.run(SHAPES, tmp_path / f"d{devices}", devices, W, *args)
        assert done.returncode == 0, done.stderr[-3000:]
        finals.add(_final(done.stdout, SHAPES))
        losses.add(tuple(re.findall(r"^step \d+ loss (\S+)", done.stdout, re.M)))
    assert len(finals) == 1, finals
    assert len(losses) == 1, losses     # LBFGS's loss: the mean over all W ranks


def test_a_resumed_accumulating_run_ends_as_an_uninterrupted_one(tmp_path):
    args = ("--shape", "accumulate", "--steps", str(STEPS))
    reference = harness.run(SHAPES, tmp_path / "ref", 1, W, *args)
    assert reference.returncode == 0, reference.stderr[-3000:]
    got, _ = _chain(SHAPES, tmp_path / "chain", *args)
    assert got == _final(reference.stdout, SHAPES)
