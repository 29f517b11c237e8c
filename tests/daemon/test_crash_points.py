"""Killed between its mark and its signal, the daemon signals on its next
pass (no timeout; every other kill point of every action is in
test_every_crash_point.py); slurmctld killed
before it saved the daemon's mark does not make the daemon act twice
(issue 19, item 9: the job was signalled a second time and FAILED).
Killed between the signal's intent in its journal and its mark in Slurm,
the daemon's successor repeats the signal on its first pass instead of
waiting a grace time, and the job still checkpoints and resizes once."""

from __future__ import annotations

from fake_slurm import Clock, FakeJob, FakeSlurm, run_for, tag
from slurm_singularity.sched.observe import read_marks


def shrink_for_premium() -> FakeSlurm:
    """A basic elastic job on all 32 GPUs that checkpoints in 2 s, then a
    premium job for 16: the daemon shrinks the basic job to 16."""
    slurm = FakeSlurm(Clock())
    slurm.add(FakeJob(1, "basic", tag("basic", 8, 32, 32), 4, 8, ckpt_s=2.0), running=True)
    slurm.add(FakeJob(2, "premium", tag("premium", 16, 16, 16), 2, 8, account="research"))
    return slurm


def assert_converged_once(slurm: FakeSlurm) -> None:
    basic, premium = slurm.fake_jobs[1], slurm.fake_jobs[2]
    assert slurm.signals_to(1) == ["TERM"], slurm.calls       # one signal, no double
    assert slurm.count("requeue", 1) == 0, slurm.calls        # no escalation needed
    assert basic.restart_count == 1                          # one requeue, its own
    assert (basic.state, basic.gpus, premium.state) == ("RUNNING", 16, "RUNNING"), slurm.calls
    assert read_marks(basic.admin_comment).resize_to is None, basic.admin_comment


def test_a_daemon_killed_between_mark_and_signal_signals_on_its_next_pass(tmp_path):
    slurm = shrink_for_premium()
    slurm.crash_after = 1        # the mark went to Slurm, the signal did not
    run_for(slurm, 60, tmp_path / "journal")
    marked_at = slurm.calls[0][0]
    signalled_at = next(t for t, what, j, _ in slurm.calls if what == "signal")
    assert slurm.calls[0][1] == "update" and "unsignalled" in slurm.calls[0][3]
    assert signalled_at - marked_at <= 1.0, (marked_at, signalled_at)
    assert_converged_once(slurm)


def test_a_mark_slurmctld_lost_is_rebuilt_from_the_journal_not_decided_again(tmp_path):
    slurm = shrink_for_premium()
    journal = tmp_path / "journal"
    daemon = run_for(slurm, 0.5, journal)                    # one pass: mark and signal
    assert slurm.signals_to(1) == ["TERM"]
    slurm.lose_unsaved_updates(within_s=1.0)                 # slurmctld kill -9, restarted
    assert read_marks(slurm.fake_jobs[1].admin_comment).resize_to is None
    run_for(slurm, 60, journal, daemon=daemon)
    assert_converged_once(slurm)


def test_a_mark_slurmctld_lost_is_rebuilt_by_a_restarted_daemon_too(tmp_path):
    slurm = shrink_for_premium()
    journal = tmp_path / "journal"
    run_for(slurm, 0.5, journal)
    slurm.lose_unsaved_updates(within_s=1.0)
    run_for(slurm, 60, journal)                              # a new daemon, same journal
    assert_converged_once(slurm)


def test_a_journal_entry_of_another_run_is_ignored_and_a_torn_line_skipped(tmp_path):
    from slurm_singularity.sched.journal import JournalEntry
    from slurm_singularity.sched.marks import ResizeStep

    journal = tmp_path / "journal"
    # job 1 of an earlier cluster (same id, another run), then a line torn by a crash
    old = JournalEntry(1, 1_700_000_000.0, 8, ResizeStep.SIGNALLED, 1_700_000_000.0,
                       run_start=1_699_999_000.0, restarts=0)
    journal.write_text(old.as_json() + "\n" + old.as_json()[:25])
    slurm = shrink_for_premium()
    run_for(slurm, 60, journal)
    assert_converged_once(slurm)
    for line in journal.read_text().splitlines():        # the torn line was dropped
        JournalEntry.from_json(line)


def test_a_daemon_killed_after_its_signal_but_before_its_mark_repeats_it_at_once(
        tmp_path, caplog):
    slurm = shrink_for_premium()
    slurm.crash_after = 2        # marked unsignalled, then signalled: no mark, no "sent"
    with caplog.at_level("INFO"):
        run_for(slurm, 60, tmp_path / "journal")
    signals = [t for t, what, j, _ in slurm.calls if what == "signal"]
    assert len(signals) == 2 and signals[1] - signals[0] <= 1.0, slurm.calls
    assert slurm.actions_in_effect() == {("signal", 1, "TERM"): 1}   # the same request
    repeated = [r.getMessage() for r in caplog.records if "repeated SIGTERM" in r.getMessage()]
    assert len(repeated) == 1, [r.getMessage() for r in caplog.records]
    basic, premium = slurm.fake_jobs[1], slurm.fake_jobs[2]
    assert slurm.count("requeue", 1) == 0, slurm.calls        # no escalation, no lost work
    assert basic.restart_count == 1
    assert (basic.state, basic.gpus, premium.state) == ("RUNNING", 16, "RUNNING"), slurm.calls
    assert read_marks(basic.admin_comment).resize_to is None, basic.admin_comment


def test_a_daemon_killed_between_its_journal_and_its_signal_signals_on_its_next_pass(tmp_path):
    slurm = shrink_for_premium()
    slurm.crash_before = 2       # the signal's intent is fsync'd, the signal never sent
    run_for(slurm, 60, tmp_path / "journal")
    marked_at = slurm.calls[0][0]
    signalled_at = next(t for t, what, j, _ in slurm.calls if what == "signal")
    assert signalled_at - marked_at <= 1.0, slurm.calls      # not a grace time later
    assert_converged_once(slurm)                              # not requeued, work kept
