"""Signal handling is idempotent from fork to exit: a launcher sent several
preemption signals at any moment (while it starts, while the workers fork
and import, mid-step, during the checkpoint, after the workers exited, while
it exits) ends requeueable (75) or finished (0), never killed by a repeat
and never with a crashed worker, and resuming gives the uninterrupted
result. Real processes: ``singularity-run`` and its forked workers."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

from slurm_singularity import contract
from slurm_singularity.runtime.api import StopReason
from slurm_singularity.runtime.history import read_history

import runtime_harness as harness
from conftest import LM_ARGS, LM_STEPS

OUTCOMES = (0, contract.REQUEUE_EXIT_CODE)


def _signal_until_exit(proc, first_after_s: float, gaps_s: list[float],
                       sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` once ``first_after_s`` after the start, then after each
    gap; keep sending every 0.2 s until the process exits (the repeats that
    land after the workers exited and while the launcher exits)."""
    time.sleep(first_after_s)
    for gap in [0.0, *gaps_s]:
        time.sleep(gap)
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
    while proc.poll() is None:
        proc.send_signal(sig)
        time.sleep(0.2)


def _resume_gives_the_reference(ckpt: Path, lm_reference: tuple[int, str]) -> None:
    done = harness.run(harness.LM, ckpt, 2, 8, *LM_ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert harness.final(done.stdout)[:2] == lm_reference


def test_two_to_five_sigterms_at_random_moments_end_requeueable_and_resume_exactly(
        tmp_path, lm_reference):
    seed = 20261130
    rng = random.Random(seed)
    # moments: while the launcher starts, while the workers fork and import
    # torch, mid-training; each followed by 1-4 repeats 0.05-1 s apart
    for attempt, first in enumerate((0.3, 1.5, 3.0 + rng.random() * 3)):
        ckpt = tmp_path / f"attempt-{attempt}"
        gaps = [rng.uniform(0.05, 1.0) for _ in range(rng.randint(1, 4))]
        proc = harness.launch(harness.LM, ckpt, 2, 8, *LM_ARGS)
        _signal_until_exit(proc, first, gaps)
        out, err = proc.communicate(timeout=180)
        assert proc.returncode in OUTCOMES, (
            f"seed {seed} attempt {attempt} first={first:.2f} gaps={gaps}: "
            f"exit {proc.returncode}\n{err[-3000:]}")
        assert "Traceback" not in err, err[-3000:]
        runs = read_history(ckpt)
        assert len(runs) == 1 and runs[0].exit_code == proc.returncode, runs
        if proc.returncode == contract.REQUEUE_EXIT_CODE:
            assert runs[0].stop is StopReason.PREEMPTED and runs[0].checkpoint_written
            _resume_gives_the_reference(ckpt, lm_reference)


def test_a_second_sigterm_after_the_checkpoint_does_not_kill_the_launcher(
        tmp_path, lm_reference):
    # Slurm's preemption SIGTERM, then the daemon's 0.8 s later: the second
    # lands while the workers exit or after they exited
    code, seen, out, err = harness.run_and_preempt(
        harness.LM, tmp_path, 2, 8, 2, *LM_ARGS, repeat_after_s=[0.8, 0.8, 0.8])
    assert code == contract.REQUEUE_EXIT_CODE, f"exit {code}\n{err[-3000:]}"
    (run,) = read_history(tmp_path)
    assert run.stop is StopReason.PREEMPTED and run.exit_code == contract.REQUEUE_EXIT_CODE
    _resume_gives_the_reference(tmp_path, lm_reference)


def test_a_sigterm_right_after_the_fork_is_a_preemption_not_a_crashed_worker(tmp_path):
    # as slurmstepd does, the signal goes to the whole process group, so the
    # workers get it directly while they import runtime.job and the script:
    # one every 50 ms from the fork on covers the window
    ckpt = tmp_path / "ckpt"
    proc = harness.launch(harness.LM, ckpt, 2, 4, *LM_ARGS, new_session=True)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    while proc.poll() is None and not workers.read_text().split():
        time.sleep(0.005)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.05)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == contract.REQUEUE_EXIT_CODE, err[-3000:]
    assert "ImportError" not in err and "Traceback" not in err, err[-3000:]
    (run,) = read_history(ckpt)
    assert run.stop is StopReason.PREEMPTED


def test_a_mix_of_the_configured_signal_and_sigterm_checkpoints_once(tmp_path, lm_reference):
    env = {contract.PREEMPT_SIGNAL: "USR1"}
    proc = harness.launch(harness.LM, tmp_path, 2, 8, *LM_ARGS, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1]) >= 2:
            break
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2, signal.SIGUSR1,
                signal.SIGTERM):
        if proc.poll() is None:
            proc.send_signal(sig)
        time.sleep(0.3)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == contract.REQUEUE_EXIT_CODE, err[-3000:]
    (run,) = read_history(tmp_path)
    assert run.stop is StopReason.PREEMPTED
    _resume_gives_the_reference(tmp_path, lm_reference)
