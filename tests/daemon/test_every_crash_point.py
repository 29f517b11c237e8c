"""The daemon killed between every pair of Slurm calls of every action it
takes (shrink, grow, preempt, release, and the escalation of a job that
ignores its signal and its requeue): right after a call, and right before
one, once the daemon has prepared it (its journal's intent fsync'd).
Started again 0.5 s later, as systemd would, it must end where an
uninterrupted daemon ends: the same jobs in the same states at the same
sizes, each signal, requeue and kill acting exactly once, no mark left
behind, and no later than 1.5 s after (a crash never costs a grace time or a
retry timeout: the action completes within one pass of the restart). On the
fake Slurm and clock: every point of every action in a few seconds.

"Acting once" is what the job sees. A daemon killed between a step's
intent in its journal and its mark in Slurm cannot know whether the step
reached Slurm, and its successor takes it again at once; a repeat to the
same run is the same action (the runtime takes a second preemption signal
as the first's request since issue 19, and Slurm requeues or kills a run
once), so it is counted once, and a job that died of it would show as
FAILED in the outcome."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest

from fake_slurm import Clock, FakeJob, FakeSlurm, run_for, tag
from slurm_singularity.sched.marks import read_marks

RUN_S = 120          # fake seconds: every scenario converges well within
LATE_S = 1.5         # most a crash may delay the end (restart 0.5 s + a pass)


def _premium_arrives(basic: FakeJob) -> FakeSlurm:
    """``basic`` running, then a premium job for 16 GPUs."""
    slurm = FakeSlurm(Clock())
    slurm.add(basic, running=True)
    slurm.add(FakeJob(2, "premium", tag("premium", 16, 16, 16), 2, 8, account="research"))
    return slurm


def shrink() -> FakeSlurm:
    """A basic elastic job on all 32 GPUs, then a premium job for 16."""
    return _premium_arrives(FakeJob(1, "basic", tag("basic", 8, 32, 32), 4, 8))


def grow() -> FakeSlurm:
    """A basic elastic job on 16 of 32 GPUs, the rest idle."""
    slurm = FakeSlurm(Clock())
    slurm.add(FakeJob(1, "basic", tag("basic", 8, 32, 32), 2, 8), running=True)
    return slurm


def preempt() -> FakeSlurm:
    """A rigid basic job on all 32 GPUs, then a premium job for 16."""
    return _premium_arrives(FakeJob(1, "basic", tag("basic", 32, 32, 32), 4, 8))


def release() -> FakeSlurm:
    """A job Slurm's own preemption requeued, waiting out the requeue delay on idle GPUs."""
    clock = Clock()
    slurm = FakeSlurm(clock)
    slurm.add(FakeJob(1, "basic", tag("basic", 16, 16, 16), 2, 8, restart_count=1,
                      reason="BeginTime", submit_time=clock.now, eligible_time=clock.now + 11))
    return slurm


def escalate() -> FakeSlurm:
    """As ``shrink``, but the basic job ignores its signal and its requeue:
    requeued one grace time after the signal, killed one more after."""
    return _premium_arrives(FakeJob(1, "basic", tag("basic", 8, 32, 32), 4, 8, ckpt_s=None,
                                    requeue_ignored=True))


SCENARIOS: dict[str, Callable[[], FakeSlurm]] = {
    f.__name__: f for f in (shrink, grow, preempt, release, escalate)}


@dataclass(frozen=True)
class Outcome:
    #: state, GPUs, restarts, job tag, resize mark (the work done, also in
    #: AdminComment, differs by the time a crash cost)
    jobs: dict[int, tuple[str, int, int, str, int | None]]
    actions: dict[tuple[str, int, str], int]       # (what, job, detail) -> how often
    last_call_at: float


def outcome(slurm: FakeSlurm, start: float) -> Outcome:
    actions = slurm.actions_in_effect()
    return Outcome({j.job_id: (j.state, j.gpus, j.restart_count,
                               read_marks(j.admin_comment).tag,
                               read_marks(j.admin_comment).resize_to)
                    for j in slurm.fake_jobs.values()}, actions,
                   max((t for t, *_ in slurm.calls), default=start) - start)


def uninterrupted(name: str, tmp_path) -> tuple[Outcome, int]:
    slurm = SCENARIOS[name]()
    start = slurm.clock.now
    run_for(slurm, RUN_S, tmp_path / f"{name}-uninterrupted")
    return outcome(slurm, start), len(slurm.calls)


@pytest.mark.parametrize("name", SCENARIOS)
def test_an_uninterrupted_action_takes_each_step_once_and_leaves_no_mark(name, tmp_path):
    done, calls = uninterrupted(name, tmp_path)
    assert calls >= 1
    assert all(n == 1 for n in done.actions.values()), done.actions
    for job in done.jobs.values():
        assert job[-1] is None, done.jobs


def _each_kill_point(name: str, tmp_path, when: str) -> None:
    expected, total = uninterrupted(name, tmp_path)
    for call in range(1, total + 1):
        slurm = SCENARIOS[name]()
        start = slurm.clock.now
        setattr(slurm, f"crash_{when}", call)
        run_for(slurm, RUN_S, tmp_path / f"{name}-{when}-{call}")
        assert getattr(slurm, f"crash_{when}") is None, "the daemon was never killed"
        got = outcome(slurm, start)
        where = (f"{name}: killed {when} call {call} of {total}: got {got}, "
                 f"uninterrupted {expected}; calls {slurm.calls}")
        assert got.jobs == expected.jobs, where
        assert got.actions == expected.actions, where
        assert got.last_call_at <= expected.last_call_at + LATE_S, where


@pytest.mark.parametrize("name", SCENARIOS)
def test_a_daemon_killed_after_any_slurm_call_of_an_action_converges_as_if_never_killed(
        name, tmp_path):
    _each_kill_point(name, tmp_path, "after")


@pytest.mark.parametrize("name", SCENARIOS)
def test_a_daemon_killed_before_any_slurm_call_of_an_action_takes_it_on_its_next_pass(
        name, tmp_path):
    _each_kill_point(name, tmp_path, "before")
