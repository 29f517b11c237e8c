"""The crash-and-resend path on the real local Slurm (issue 18, part 4): a
daemon killed right after it sent a training job its shrink signal, before
it marked the signal in Slurm, leaves an intent in its journal; the daemon
started after it sends the signal again on its first pass instead of
waiting a grace time. The job, signalled twice, checkpoints once, is
requeued once, runs again at the smaller size and ends with the parameters
of an uninterrupted run, never FAILED: the runtime takes the second signal
as the first's request.

The daemon runs in this process (``Daemon.run_pass`` every 0.5 s, the
journal on disk) so that the kill falls exactly between the signal and the
mark, a point a ``kill -9`` of the daemon's process hits once in hundreds."""

from __future__ import annotations

import logging
import time

import pytest

from slurm_singularity.policy.load import parse_policy
from slurm_singularity.runtime.history import read_history
from slurm_singularity.sched.daemon import Daemon, DaemonSettings
from slurm_singularity.sched.executor import ExecutorSettings

from test_preemption import FINAL, reference_sha, steps_done, submit_training, wait_until
from test_schedd import _cancel_all, apply_policy, daemon_policy, paths

pytestmark = pytest.mark.cluster

STEPS = 48


class DaemonKilled(BaseException):
    """The daemon's process died here (nothing in the daemon catches it)."""


class Signals:
    """The cluster's SlurmClient, counting the preemption signals sent to
    each job; with ``kill_after_first``, the daemon dies right after it."""

    def __init__(self, client, kill_after_first: bool) -> None:
        self._client = client
        self.kill_after_first = kill_after_first
        self.sent: list[tuple[int, str]] = []

    def __getattr__(self, name):
        return getattr(self._client, name)

    def cancel(self, *job_ids: int, signal: str | None = None, full: bool = False) -> None:
        self._client.cancel(*job_ids, signal=signal, full=full)
        if signal and signal != "KILL":
            self.sent.extend((j, signal) for j in job_ids)
            if self.kill_after_first:
                raise DaemonKilled(f"killed after SIG{signal} to {job_ids}")


def _run_passes(daemon: Daemon, until, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        daemon.run_pass()
        time.sleep(0.5)


def _gpus(cluster, job: int) -> int:
    return next((j.allocated_gpus for j in cluster.client.jobs()
                 if j.job_id == job and j.state == "RUNNING"), 0)


def test_a_job_signalled_again_by_a_restarted_daemon_checkpoints_and_shrinks_once(
        slurm_cluster, tmp_path, caplog):
    cluster = slurm_cluster
    want = reference_sha(tmp_path, STEPS)
    _cancel_all(cluster)
    policy_path = daemon_policy(tmp_path)
    apply_policy(cluster, policy_path)     # Slurm preempts nothing by itself
    policy = parse_policy(policy_path.read_text())
    settings = DaemonSettings(period_s=0.5, journal_path=tmp_path / "journal",
                              executor=ExecutorSettings(gpus_per_node=8))
    try:
        # the basic job on one whole node, premium jobs on the three others
        job, out, ckpt = submit_training(cluster, tmp_path, steps=STEPS, ckpt_every=1000,
                                         sbatch="--elastic=2:8 --gres=gpu:8")
        wait_until(lambda: steps_done(out) >= 3, 180, "step 3")
        assert _gpus(cluster, job) == 8
        cluster.run("sbatch", "--sla=premium", "--account=research", "-N3", "--gres=gpu:8",
                    "-o", "/dev/null", "--wrap", "sleep 600", check=True)
        cluster.run("sbatch", "--sla=premium", "--account=research", "-N1", "--gres=gpu:4",
                    "-o", "/dev/null", "--wrap", "sleep 5", check=True)

        first = Signals(cluster.client, kill_after_first=True)
        with pytest.raises(DaemonKilled):
            _run_passes(Daemon(first, policy, settings), lambda: False, 60, "the shrink signal")
        assert first.sent == [(job, "TERM")]

        again = Signals(cluster.client, kill_after_first=False)
        restarted_at = time.monotonic()
        with caplog.at_level(logging.INFO, logger="slurm_singularity.sched.daemon"):
            daemon = Daemon(again, policy, settings)
            daemon.run_pass()
            resent_in = time.monotonic() - restarted_at
            _run_passes(daemon, lambda: 0 < _gpus(cluster, job) < 8, 120, "the shrink")
        rec = cluster.wait_job(job, timeout=300)
    finally:
        _cancel_all(cluster)
        apply_policy(cluster, paths.TEMPLATES_DIR / "policy.toml")

    log = "\n".join(r.getMessage() for r in caplog.records)
    assert again.sent == [(job, "TERM")] and resent_in < 5, (again.sent, resent_in, log)
    assert f"[job {job}] resize to" in log and "repeated SIGTERM" in log, log
    text = out.read_text()
    assert rec["JobState"] == "COMPLETED", (rec, text[-3000:])
    m = FINAL.search(text)
    assert m and int(m.group(1)) == STEPS and m.group(2) == want, text[-2000:]
    history = read_history(ckpt)
    assert [h.stop.value for h in history] == ["preempted", "finished"], history
    assert history[0].devices == 8 and 0 < history[1].devices < 8, history
    states = [r.state for r in cluster.client.job_runs(job)]
    assert "FAILED" not in states, states
    print(f"repeated signal: resent {resent_in:.2f} s after the restart; runs "
          f"{[(h.devices, h.stop.value) for h in history]}; sacct {states}")
