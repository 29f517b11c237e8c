"""A fake SlurmClient on a fake clock, for the daemon's decisions.

Why: the daemon's rules (when to signal, requeue, kill, release; what to
trust) are its own, not Slurm's, and a crash between two of its Slurm calls
is a point a real cluster reaches once in minutes. Here a test runs hundreds
of passes in milliseconds and kills the daemon after any call.

The fake keeps what the daemon reads (squeue's fields, as ``CliSlurmClient``
returns them) and does what Slurm 22.05 did on the local cluster: a job that
exits with the requeue code is requeued with ``submit_time`` reset and a
begin time ``requeue_delay_s`` later (reason BeginTime); ``StartTime=now+1``
moves that begin time; pending jobs start in priority order (higher tier
first) on the first nodes with room. A second preemption signal to a run is
the same request, as the runtime takes it since issue 19 (item 3; its
handler sets a flag: ``runtime/job.py``'s ``PreemptFlag``, and
tests/cluster/test_double_sigterm.py on the real Slurm); a job that
``dies_of_double_signal`` is the runtime before that fix, which failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slurm_singularity import contract
from slurm_singularity.slurm.api import Job, Node, SlurmError

TIER_RANK = {"premium": 2, "standard": 1, "basic": 0}


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class DaemonKilled(BaseException):
    """The daemon's process died here (not an Exception: nothing catches it)."""


@dataclass
class FakeJob:
    job_id: int
    partition: str
    admin_comment: str
    nodes: int                 # requested nodes
    per_node: int              # requested GPUs per node
    account: str = "default"
    state: str = "PENDING"
    reason: str = "Priority"
    restart_count: int = 0
    submit_time: float = 0.0
    start_time: float = 0.0
    eligible_time: float = 0.0
    priority: int = 1000
    placement: list[tuple[str, int]] = field(default_factory=list)
    step_at: float = 0.0       # when its srun step started
    #: Checkpoints and exits with the requeue code this long after the
    #: preemption signal; None = ignores the signal.
    ckpt_s: float | None = 2.0
    #: A second signal during the checkpoint fails the job (FAILED 15:0),
    #: as the runtime did before issue 19; default: one request.
    dies_of_double_signal: bool = False
    #: ``scontrol requeue`` does not take (a node that does not answer).
    requeue_ignored: bool = False
    exit_at: float | None = None
    signals: list[tuple[float, str]] = field(default_factory=list)

    @property
    def gpus(self) -> int:
        return self.nodes * self.per_node


class FakeSlurm:
    """``SlurmClient`` over an in-memory cluster of ``n`` nodes."""

    env: dict[str, str] = {}

    def __init__(self, clock: Clock, n: int = 4, gpus_per_node: int = 8,
                 requeue_delay_s: float = 11.0) -> None:
        self.clock = clock
        self.node_names = [f"n{i}" for i in range(1, n + 1)]
        self.gpus_per_node = gpus_per_node
        self.requeue_delay_s = requeue_delay_s
        self.fake_jobs: dict[int, FakeJob] = {}
        #: every call that changes something: (time, what, job, detail)
        self.calls: list[tuple[float, str, int, str]] = []
        #: the run (restart count) each call of ``calls`` reached
        self.call_runs: list[int] = []
        #: raise DaemonKilled after this many changing calls
        self.crash_after: int | None = None
        #: raise DaemonKilled as the daemon makes its changing call number
        #: ``crash_before``, before Slurm gets it (after all the daemon did
        #: to prepare it, its journal's fsync too)
        self.crash_before: int | None = None
        #: AdminComment updates with their times, to lose the unsaved ones
        self._comments: list[tuple[float, int, str]] = []
        self._original: dict[int, str] = {}

    # -- set-up -----------------------------------------------------------

    def add(self, job: FakeJob, running: bool = False) -> FakeJob:
        now = self.clock.now
        job.submit_time = job.submit_time or now
        self.fake_jobs[job.job_id] = job
        if running:
            self._start(job, now, placement=self._place(job.nodes, job.per_node))
            job.step_at = now - 60
        return job

    # -- SlurmClient --------------------------------------------------------

    def nodes(self) -> list[Node]:
        return [Node(n, "mixed", self.gpus_per_node, 16) for n in self.node_names]

    def jobs(self) -> list[Job]:
        self.tick()
        return [self._job(j) for j in self.fake_jobs.values()]

    def running_steps(self, job_id: int) -> list[tuple[str, float]]:
        self.tick()
        j = self.fake_jobs[job_id]
        if j.state != "RUNNING" or self.clock.now < j.step_at:
            return []
        return [(f"{job_id}.0", self.clock.now - j.step_at)]

    def scontrol(self, *args: str) -> str:
        self.tick()
        now = self.clock.now
        if args[0] == "requeue":
            j = self.fake_jobs[int(args[1])]
            self._record("requeue", j.job_id, "")
            if j.state != "RUNNING":
                raise SlurmError(["scontrol", *args], 1, "Job is not running")
            if not j.requeue_ignored:
                self._requeue(j, now)
            return self._after_call()
        if args[0] != "update":
            raise SlurmError(["scontrol", *args], 1, f"fake: unsupported {args}")
        j = self.fake_jobs[int(args[1].split("=", 1)[1])]
        detail = " ".join(args[2:])
        self._record("update", j.job_id, detail)
        for arg in args[2:]:
            key, _, value = arg.partition("=")
            if key == "AdminComment":
                j.admin_comment = value
                self._comments.append((now, j.job_id, value))
            elif key == "StartTime":
                if j.state != "PENDING":
                    raise SlurmError(["scontrol", *args], 1, "Job is no longer pending")
                j.eligible_time = now + float(value.removeprefix("now").lstrip("+") or 0)
                j.start_time = j.eligible_time
            elif key == "NumNodes":
                j.nodes = int(value.split("-")[0])
            elif key == "TresPerNode":
                j.per_node = int(value.rsplit(":", 1)[1])
        return self._after_call()

    def show_job(self, job_id: int) -> dict[str, str]:
        j = self.fake_jobs[job_id]
        return {"JobId": str(job_id), "JobState": j.state, "AdminComment": j.admin_comment}

    def cancel(self, *job_ids: int, signal: str | None = None, full: bool = False) -> None:
        self.tick()
        now = self.clock.now
        for job_id in job_ids:
            j = self.fake_jobs[job_id]
            self._record("signal" if signal else "cancel", job_id, signal or "")
            if j.state != "RUNNING":
                raise SlurmError(["scancel"], 1, "Job is not running")
            j.signals.append((now, signal or "KILL"))
            if signal in (None, "KILL"):
                self._requeue(j, now)
            elif j.exit_at is not None and j.dies_of_double_signal:
                j.state, j.placement = "FAILED", []       # issue 19, item 3
            elif j.ckpt_s is not None and j.exit_at is None:
                j.exit_at = now + j.ckpt_s
        self._after_call()

    def submit(self, args, script=None) -> int:
        raise NotImplementedError

    def ensure_accounts(self, accounts, users) -> list[str]:
        return []

    def job_runs(self, job_id: int) -> list:
        return []

    # -- what Slurm does by itself -------------------------------------------

    def tick(self) -> None:
        now = self.clock.now
        for j in self.fake_jobs.values():
            if j.state == "RUNNING" and j.exit_at is not None and j.exit_at <= now:
                self._requeue(j, j.exit_at)               # RequeueExit
        pending = sorted((j for j in self.fake_jobs.values() if j.state == "PENDING"),
                         key=lambda j: (-TIER_RANK.get(j.partition, 0), j.submit_time, j.job_id))
        for j in pending:
            if j.priority == 0 or j.eligible_time > now:
                continue
            placement = self._place(j.nodes, j.per_node)
            if placement:
                self._start(j, now, placement)
            elif j.reason != "BeginTime" or j.eligible_time <= now:
                j.reason = "Resources"

    def lose_unsaved_updates(self, within_s: float = 0.1) -> None:
        """slurmctld killed with SIGKILL: AdminComment updates of the last
        ``within_s`` seconds were not saved and are gone after its restart."""
        now = self.clock.now
        lost = [c for c in self._comments if c[0] > now - within_s]
        kept = [c for c in self._comments if c[0] <= now - within_s]
        for _, job_id, _ in lost:
            older = [c for c in kept if c[1] == job_id]
            self.fake_jobs[job_id].admin_comment = (older[-1][2] if older
                                                    else self._original[job_id])
        self._comments = kept

    # -- helpers --------------------------------------------------------------

    def _record(self, what: str, job_id: int, detail: str) -> None:
        if self.crash_before is not None and len(self.calls) + 1 >= self.crash_before:
            self.crash_before = None
            raise DaemonKilled(f"killed before call {len(self.calls) + 1}")
        self._original.setdefault(job_id, self.fake_jobs[job_id].admin_comment)
        self.calls.append((self.clock.now, what, job_id, detail))
        self.call_runs.append(self.fake_jobs[job_id].restart_count)

    def _after_call(self) -> str:
        if self.crash_after is not None and len(self.calls) >= self.crash_after:
            self.crash_after = None
            raise DaemonKilled(f"killed after call {len(self.calls)}")
        return ""

    def _free(self) -> dict[str, int]:
        free = {n: self.gpus_per_node for n in self.node_names}
        for j in self.fake_jobs.values():
            for n, g in j.placement:
                free[n] -= g
        return free

    def _place(self, nodes: int, per_node: int) -> list[tuple[str, int]]:
        free = self._free()
        fits = [n for n in self.node_names if free[n] >= per_node]
        return [(n, per_node) for n in fits[:nodes]] if len(fits) >= nodes else []

    def _start(self, j: FakeJob, now: float, placement: list[tuple[str, int]]) -> None:
        j.state, j.reason, j.placement = "RUNNING", "None", placement
        j.start_time, j.step_at, j.exit_at = now, now + 0.5, None

    def _requeue(self, j: FakeJob, when: float) -> None:
        j.state, j.reason, j.placement = "PENDING", "BeginTime", []
        j.restart_count += 1
        j.submit_time = when
        j.eligible_time = j.start_time = when + self.requeue_delay_s
        j.exit_at = None

    def _job(self, j: FakeJob) -> Job:
        return Job(j.job_id, f"job{j.job_id}", j.state, j.partition, j.account, "u1",
                   ",".join(n for n, _ in j.placement), reason=j.reason,
                   restart_count=j.restart_count, gpus=j.gpus, admin_comment=j.admin_comment,
                   submit_time=j.submit_time, start_time=j.start_time,
                   eligible_time=j.eligible_time, priority=j.priority,
                   placement=tuple(j.placement) if j.state == "RUNNING" else ())

    # -- what a test reads -----------------------------------------------------

    def signals_to(self, job_id: int) -> list[str]:
        return [d for _, what, j, d in self.calls if what == "signal" and j == job_id]

    def actions_in_effect(self) -> dict[tuple[str, int, str], int]:
        """How often each signal, requeue and kill acted: a repeat to the
        same run of a job is the same action (the runtime takes a second
        signal as the first's request; Slurm requeues or kills a run once)."""
        seen = {(what, job, detail, run) for (_, what, job, detail), run
                in zip(self.calls, self.call_runs) if what in ("signal", "requeue", "cancel")}
        out: dict[tuple[str, int, str], int] = {}
        for what, job, detail, _ in seen:
            out[(what, job, detail)] = out.get((what, job, detail), 0) + 1
        return out

    def count(self, what: str, job_id: int, needle: str = "") -> int:
        return sum(1 for _, w, j, d in self.calls if w == what and j == job_id and needle in d)


def tag(sla: str, lo: int, hi: int, world: int) -> str:
    return contract.format_job_tag(sla, (lo, hi), world)


def make_daemon(slurm: FakeSlurm, journal_path=None, policy_text: str | None = None):
    """A daemon on the fake cluster and clock, with the default policy
    (``preemption = "daemon"``) and a pass every 0.5 s of fake time."""
    from slurm_singularity import paths
    from slurm_singularity.policy.load import parse_policy
    from slurm_singularity.sched.daemon import Daemon, DaemonSettings

    text = policy_text or (paths.TEMPLATES_DIR / "policy.toml").read_text().replace(
        'preemption = "slurm"', 'preemption = "daemon"')
    settings = DaemonSettings(period_s=0.5, journal_path=journal_path)
    return Daemon(slurm, parse_policy(text), settings, clock=slurm.clock)


def run_for(slurm: FakeSlurm, seconds: float, journal_path=None, daemon=None,
            restart=None):
    """Run daemon passes every 0.5 s of fake time for ``seconds``. A daemon
    killed in a pass (``DaemonKilled``) is started again, new, 0.5 s later,
    as systemd would; ``restart`` is called then. Returns the last daemon."""
    daemon = daemon or make_daemon(slurm, journal_path)
    end = slurm.clock.now + seconds
    while slurm.clock.now < end:
        try:
            daemon.run_pass()
        except DaemonKilled:
            if restart:
                restart()
            daemon = make_daemon(slurm, journal_path)
        slurm.clock.now += 0.5
    return daemon
