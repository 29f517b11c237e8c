"""The scheduler-hook daemon: observe Slurm, plan, act, on a fixed period.

Slurm does the placement; the daemon decides sizes (grow into idle GPUs,
shrink instead of preempting, serve tiers and fairness) by calling the same
pure planner that the simulator calls, and carries the decisions out through
``Executor``. It keeps no state of its own beyond a write-ahead journal of
the steps it cannot take back (``journal.py``): every pass starts from what
Slurm says (see ``observe.py``), brought forward by the journal where
slurmctld lost an update, so it can be killed and restarted at any moment
and never takes a step twice.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..policy.api import Policy, PolicyError
from ..slurm.api import SlurmClient, SlurmError
from .api import Action, ActionKind, JobPhase, SchedError
from .executor import Executor, ExecutorSettings
from .journal import Journal
from .observe import observe
from .planner import plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DaemonSettings:
    """Settings of ``singularity-schedd``."""

    #: Seconds between passes; 0.2..3600. Default 2.
    period_s: float = 2.0
    #: Port of the Prometheus metrics endpoint; 0 = no endpoint.
    metrics_port: int = 0
    #: Stop after this many passes; 0 = run until signalled (tests use it).
    max_passes: int = 0
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)
    #: The write-ahead journal of signals, requeues and kills (one per
    #: cluster; see journal.py); None = none (a slurmctld killed before it
    #: saved a mark may then see an action repeated).
    journal_path: Path | None = None

    def __post_init__(self) -> None:
        if not 0.2 <= self.period_s <= 3600:
            raise ValueError(f"--period must be between 0.2 and 3600 s, not {self.period_s}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be between 0 and 65535, not {self.metrics_port}")


class Metrics:
    """Prometheus metrics of the daemon (a private registry, so several
    daemons can live in one test process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.gpus_busy = Gauge("singularity_gpus_busy", "GPUs held, per tier", ["tier"],
                               registry=self.registry)
        self.jobs = Gauge("singularity_jobs", "Jobs per tier and phase", ["tier", "phase"],
                          registry=self.registry)
        self.actions = Counter("singularity_actions_total", "Actions carried out", ["kind"],
                               registry=self.registry)
        self.sla = Gauge("singularity_sla_attainment",
                         "Share of running jobs at or above their tier's GPU-fraction promise",
                         ["tier"], registry=self.registry)
        self.pass_time = Histogram("singularity_planner_pass_seconds", "Planner pass time",
                                   registry=self.registry)
        self.errors = Counter("singularity_errors_total", "Failed Slurm calls",
                              registry=self.registry)

    def serve(self, port: int) -> None:
        from prometheus_client import start_http_server

        start_http_server(port, addr="127.0.0.1", registry=self.registry)


class Daemon:
    """One observe -> plan -> act loop."""

    def __init__(self, client: SlurmClient, policy: Policy, settings: DaemonSettings,
                 clock: Callable[[], float] = time.time,
                 live_policy: Callable[[], Policy] | None = None) -> None:
        """``live_policy``, when given, is asked for the policy before each
        pass (``policy.install.LivePolicy.current``): a new one is taken
        over; while it raises ``PolicyError`` (Slurm enforces another) the
        daemon observes nothing and acts on nothing."""
        self.client = client
        self.policy = policy
        self.live_policy = live_policy
        self._policy_refused: str | None = None
        self.settings = settings
        self.clock = clock
        self.journal = Journal(settings.journal_path) if settings.journal_path else None
        self.executor = Executor(client, policy, settings.executor, clock, self.journal)
        self.metrics = Metrics()
        self._stop = threading.Event()
        #: jobs already reported (a bad tag, an untagged victim): each is
        #: reported once per daemon, not every pass
        self._warned: set[int] = set()
        self._untagged_warned: set[int] = set()

    def stop(self, reason: str) -> None:
        log.info("stopping: %s", reason)
        self._stop.set()

    def run(self) -> int:
        """Run passes until stopped. Returns the exit code."""
        if self.settings.metrics_port:
            self.metrics.serve(self.settings.metrics_port)
            log.info("metrics on http://127.0.0.1:%d/metrics", self.settings.metrics_port)
        passes = 0
        while not self._stop.is_set():
            try:
                self.run_pass()
            except SlurmError as exc:
                self.metrics.errors.inc()
                log.warning("pass failed, retrying next period: %s", exc)
            passes += 1
            if self.settings.max_passes and passes >= self.settings.max_passes:
                break
            self._stop.wait(self.settings.period_s)
        return 0

    def run_pass(self) -> list[tuple[Action, str]]:
        """One pass; returns the actions carried out with what was done.

        :raises SlurmError: Slurm could not be read.
        """
        if self.live_policy is not None and not self._take_live_policy():
            return []
        now = self.clock()
        jobs = self.client.jobs()
        obs = observe(jobs, self.client.nodes(), self.policy, now, journal=self.journal,
                      warned=self._warned)
        if self.journal is not None:
            self.journal.keep_only({j.job_id for j in jobs})
        done: list[tuple[Action, str]] = []
        touched: set[int] = set()
        # Put back marks Slurm lost, then finish resizes in flight (step 3).
        for job_id, view in obs.views.items():
            try:
                repaired = self.executor.repair_marks(view)
                if repaired:
                    log.warning("[job %s] %s", job_id, repaired)
                what = self.executor.continue_resize(view)
            except (SlurmError, SchedError, OSError) as exc:
                self.metrics.errors.inc()
                log.warning("[job %s] continuing its resize failed: %s", job_id, exc)
                touched.add(job_id)
                continue
            if what:
                touched.add(job_id)
                log.info("[job %s] resize to %s: %s", job_id, view.marks.resize_to, what)
        t0 = time.perf_counter()
        actions = plan(obs.state, self.policy)
        self.metrics.pass_time.observe(time.perf_counter() - t0)
        for action in actions:
            view = obs.views.get(action.job_id)
            if view is None or action.kind is ActionKind.LEAVE or action.job_id in touched:
                continue   # a job whose resize this pass continued is seen anew next pass
            if action.kind is ActionKind.START and action.devices_to == view.requested:
                # Slurm starts it as it is; at most cut its requeue delay short
                if view.requeued and not self.settings.executor.dry_run:
                    self.executor.release(view)
                continue
            if action.kind is not ActionKind.START and not view.tagged:
                if action.job_id not in self._untagged_warned:
                    self._untagged_warned.add(action.job_id)
                    log.warning("[job %s] not resized or preempted: it carries no job tag "
                                "of the project's (AdminComment %.80r)", action.job_id,
                                view.job.admin_comment)
                continue
            try:
                what = self.executor.execute(action, view)
            except (SlurmError, SchedError, OSError) as exc:
                self.metrics.errors.inc()
                log.warning("[job %s] %s failed: %s", action.job_id, action.kind.value, exc)
                continue
            self.metrics.actions.labels(action.kind.value).inc()
            log.info("[job %s] %s %d -> %d: %s (%s)", action.job_id, action.kind.value,
                     action.devices_from, action.devices_to, action.reason, what)
            done.append((action, what))
        self._update_gauges(obs.state, now)
        return done

    def _take_live_policy(self) -> bool:
        """Follow the live policy; False (and one warning per reason) while
        Slurm enforces another policy than the daemon would act on."""
        try:
            policy = self.live_policy()  # type: ignore[misc]
        except PolicyError as exc:
            if str(exc) != self._policy_refused:
                self._policy_refused = str(exc)
                log.error("not acting until the policy is the one Slurm enforces: %s", exc)
            return False
        if self._policy_refused is not None:
            log.info("acting again: the policy is the one Slurm enforces")
            self._policy_refused = None
        if policy.sha256 != self.policy.sha256:
            log.info("new policy (sha256 %s) taken over: Slurm enforces it now",
                     (policy.sha256 or "")[:12])
            self.policy = self.executor.policy = policy
        return True

    def _update_gauges(self, state, now: float) -> None:
        m = self.metrics
        busy: dict[str, int] = {t.value: 0 for t in self.policy.tiers}
        phases: dict[tuple[str, str], int] = {}
        met: dict[str, list[int]] = {t.value: [0, 0] for t in self.policy.tiers}
        for job in state.jobs:
            busy[job.tier.value] = busy.get(job.tier.value, 0) + job.devices
            key = (job.tier.value, job.phase.value)
            phases[key] = phases.get(key, 0) + 1
            if job.phase is JobPhase.RUNNING:
                promise = self.policy.tiers[job.tier].gpu_fraction
                met[job.tier.value][1] += 1
                met[job.tier.value][0] += job.gpu_fraction(now) >= promise
        for tier, n in busy.items():
            m.gpus_busy.labels(tier).set(n)
        m.jobs.clear()
        for (tier, phase), n in phases.items():
            m.jobs.labels(tier, phase).set(n)
        for tier, (ok, total) in met.items():
            m.sla.labels(tier).set(ok / total if total else 1.0)


def install_signal_handlers(daemon: Daemon) -> None:
    """SIGTERM and SIGINT stop the loop after the current pass."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: daemon.stop(f"received {signal.Signals(s).name}"))
