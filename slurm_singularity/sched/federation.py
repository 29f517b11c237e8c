"""Global placement over a Slurm federation: one decision maker that sees
every member cluster and chooses the cluster for each pending job.

Why shaped so: Slurm federation submits a job to every sibling and lets the
first that can start it win; it knows nothing of tiers, of fair-share across
the federation or of where a job's checkpoint lies. Slurm 22.05 lets an
operator narrow a pending federated job's siblings
(``scontrol update JobId=N Clusters=west``: its viable siblings become
``west``, every other sibling's copy is revoked; verified on the local
federation), so placement is that one update, and the decision lives in
Slurm: a job whose viable siblings are one cluster is placed, and a placer
killed and restarted sees that and does not place it again (nothing of its
own to lose).

``place`` is pure: member states and pending jobs in, placements out. The
order is the planner's (tier first), then fair-share across the whole
federation (the account holding fewest GPUs on all members together first),
then submission time. A job goes to the member that holds its checkpoint
(each local member has its own storage root, and a checkpoint is read where
it lies), else to the member with room for it that has the most free GPUs
left after the jobs placed before it; a job no member has room for is left
to Slurm's own first-sibling routing. ``FederationPlacer`` does the I/O:
observe each member through its ``SlurmClient``, place, narrow.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from ..policy.api import Policy, Tier
from ..slurm.api import SlurmClient, SlurmError
from .api import ClusterState, JobPhase
from .observe import observe

if TYPE_CHECKING:
    from .fedmoves import MoveSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingJob:
    """A pending federated job, as the placer sees it."""

    job_id: int
    tier: Tier
    #: Slurm account (charged for its GPUs on every member alike).
    account: str
    #: Nodes the job asks for; >= 1.
    nodes: int
    #: GPUs it asks for on each of its nodes; >= 0.
    gpus_per_node: int
    #: Submission time, epoch seconds.
    submit_time: float
    #: Member clusters it may still run on (Slurm's viable siblings).
    viable: tuple[str, ...]
    #: The member whose storage root holds its checkpoint; None = none found.
    checkpoint_at: str | None = None
    #: Bytes of that checkpoint (what a move copies).
    checkpoint_bytes: int = 0
    #: Held (by its user, an admin or a migration): placed, but no demand.
    held: bool = False

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Placement:
    """Narrow ``job_id``'s siblings to ``cluster``, for ``reason``; with
    ``migrate_from``, first copy its checkpoint from that member's storage
    to ``cluster``'s (the job is held meanwhile: ``migrate.py``)."""

    job_id: int
    cluster: str
    reason: str
    migrate_from: str | None = None


def account_usage(members: Mapping[str, ClusterState]) -> dict[str, int]:
    """GPUs each account holds now, summed over every member cluster."""
    usage: dict[str, int] = {}
    for state in members.values():
        for job in state.jobs:
            if job.devices:
                usage[job.account] = usage.get(job.account, 0) + job.devices
    return usage


@dataclass(frozen=True)
class MoveCost:
    """What moving a checkpoint between clusters costs, and the most a move
    may cost."""

    #: Copy bandwidth between two members, bytes per second; > 0.
    bytes_per_s: float = 200e6
    #: Longest copy worth making, seconds; 0 = never move a checkpoint.
    max_copy_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.bytes_per_s > 0:
            raise ValueError(f"bytes_per_s (--copy-bandwidth) must be > 0, not {self.bytes_per_s}")
        if not 0 <= self.max_copy_s <= 86400:
            raise ValueError(f"max_copy_s (--max-copy) must be between 0 and 86400 s, "
                             f"not {self.max_copy_s}")

    def seconds(self, size: int) -> float:
        return size / self.bytes_per_s


def place(members: Mapping[str, ClusterState], pending: Sequence[PendingJob],
          cost: MoveCost = MoveCost()) -> tuple[Placement, ...]:
    """Where each pending job goes (see the module docstring). A job already
    narrowed to one member is not placed again, but takes its room there. A
    job whose checkpoint's cluster is full moves (its checkpoint copied) to
    a member with room only if the copy takes at most ``cost.max_copy_s``."""
    free = {name: sorted((n.free_gpus for n in state.nodes), reverse=True)
            for name, state in members.items()}
    usage = account_usage(members)
    order = sorted(pending, key=lambda j: (-j.tier.rank, usage.get(j.account, 0),
                                           j.submit_time, j.job_id))
    out = []
    for job in order:
        viable = [m for m in job.viable if m in free]
        if not viable:
            continue
        if len(job.viable) == 1:
            _take(free[viable[0]], job)
            continue
        room = [m for m in viable if _fits(free[m], job)]
        moved_from = None
        copy_s = cost.seconds(job.checkpoint_bytes)
        if job.checkpoint_at in viable and (job.checkpoint_at in room or not room
                                            or copy_s > cost.max_copy_s):
            chosen = job.checkpoint_at
            reason = f"its checkpoint lies in {chosen}'s storage"
        elif job.checkpoint_at in viable:
            # its checkpoint's cluster is full (a higher tier took it):
            # resume where there is room, after copying the checkpoint there
            chosen = max(room, key=lambda m: (sum(free[m]), -viable.index(m)))
            moved_from = job.checkpoint_at
            reason = (f"its checkpoint lies in {moved_from}'s storage but {moved_from} has no "
                      f"room; {chosen} has {sum(free[chosen])} GPUs free: copy it there "
                      f"({job.checkpoint_bytes} bytes, ~{copy_s:.1f} s)")
        elif room:
            chosen = max(room, key=lambda m: (sum(free[m]), -viable.index(m)))
            reason = (f"{chosen} has room for its {job.nodes}x{job.gpus_per_node} GPUs "
                      f"({sum(free[chosen])} free)")
        else:
            continue            # left to Slurm's first sibling that can start it
        _take(free[chosen], job)
        usage[job.account] = usage.get(job.account, 0) + job.gpus
        out.append(Placement(job.job_id, chosen, reason, moved_from))
    return tuple(out)


def _fits(free: list[int], job: PendingJob) -> bool:
    return sum(1 for f in free if f >= job.gpus_per_node) >= job.nodes


def _take(free: list[int], job: PendingJob) -> None:
    """Take the job's GPUs from the nodes that fit it most tightly."""
    if not _fits(free, job):
        return
    for _ in range(job.nodes):
        i = min((k for k, f in enumerate(free) if f >= job.gpus_per_node), key=lambda k: free[k])
        free[i] -= job.gpus_per_node
    free.sort(reverse=True)


# -- I/O -----------------------------------------------------------------------

@dataclass(frozen=True)
class Member:
    """One member cluster of the federation, as the placer reaches it."""

    #: Slurm ClusterName.
    name: str
    #: Talks to this member's slurmctld.
    client: SlurmClient
    #: Where this member keeps checkpoints; None = it has no storage of its own.
    storage_root: Path | None = None


def federated_checkpoint_dir(job_id: int) -> Path:
    """Where a federated job keeps its checkpoint, relative to the storage
    root of the cluster it runs on (its script sets
    ``SINGULARITY_CKPT_DIR=<that root>/ckpt/job-$SLURM_JOB_ID``); a
    migration copies it to the same place under the destination's root."""
    return Path("ckpt") / f"job-{job_id}"


def checkpoint_member(members: Sequence[Member], job_id: int) -> tuple[str | None, int]:
    """The member whose storage root holds the job's checkpoint (its
    ``federated_checkpoint_dir``), when it holds anything, and its bytes."""
    for m in members:
        size = checkpoint_bytes(m, job_id)
        if size is not None:
            return m.name, size
    return None, 0


def checkpoint_bytes(member: Member, job_id: int) -> int | None:
    """Bytes of the job's checkpoint in ``member``'s storage root; None when
    it holds no file of it (or cannot be read)."""
    if member.storage_root is None:
        return None
    ckpt = member.storage_root / federated_checkpoint_dir(job_id)
    try:
        files = [p for p in ckpt.rglob("*") if p.is_file()] if ckpt.is_dir() else []
        return sum(p.stat().st_size for p in files) if files else None
    except OSError:
        return None


@dataclass
class Observed:
    """One pass's view of the federation."""

    states: dict[str, ClusterState]
    pending: list[PendingJob]
    #: job id -> the member whose slurmctld is its origin (where updates go)
    origin: dict[int, str]


def observe_federation(members: Sequence[Member], policy: Policy, now: float) -> Observed:
    """Every member's ``ClusterState`` and the pending federated jobs, each
    once (a pending job has a copy on each viable sibling).

    :raises SlurmError: a member could not be read.
    """
    states: dict[str, ClusterState] = {}
    pending: dict[int, PendingJob] = {}
    origin: dict[int, str] = {}
    for m in members:
        jobs = m.client.jobs()
        obs = observe(jobs, m.client.nodes(), policy, now)
        # a pending copy counts on one member only (its demand is global)
        states[m.name] = obs.state
        for st in obs.state.jobs:
            if st.phase not in (JobPhase.PENDING, JobPhase.HELD) or st.job_id in pending:
                continue
            job = obs.views[st.job_id].job
            viable = job.federation_siblings_viable
            if not viable:
                continue                   # not a federated job
            requested = obs.views[st.job_id].requested
            nodes = max(1, job.node_count)
            pending[st.job_id] = PendingJob(
                st.job_id, st.tier, st.account, nodes, requested // nodes, st.submit_time,
                viable, *checkpoint_member(members, st.job_id),
                held=st.phase is JobPhase.HELD)
            origin[st.job_id] = job.federation_origin or m.name
    for name, state in states.items():
        # pending copies are the federation's demand, not one member's
        states[name] = ClusterState(state.now, state.nodes, tuple(
            j for j in state.jobs if j.phase not in (JobPhase.PENDING, JobPhase.HELD)))
    return Observed(states, list(pending.values()), origin)


class PlacerMetrics:
    """Prometheus metrics of the federation placer; every series names its
    cluster (a private registry)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        self.gpus_busy = Gauge("singularity_gpus_busy", "GPUs held, per cluster and tier",
                               ["cluster", "tier"], registry=self.registry)
        self.gpus_free = Gauge("singularity_gpus_free", "Free GPUs per cluster", ["cluster"],
                               registry=self.registry)
        self.jobs = Gauge("singularity_jobs", "Running jobs per cluster and tier",
                          ["cluster", "tier"], registry=self.registry)
        self.placements = Counter("singularity_placements_total",
                                  "Pending jobs narrowed to one cluster", ["cluster"],
                                  registry=self.registry)
        self.account_gpus = Gauge("singularity_account_gpus",
                                  "GPUs an account holds across the federation", ["account"],
                                  registry=self.registry)
        self.errors = Counter("singularity_errors_total", "Failed Slurm calls", ["cluster"],
                              registry=self.registry)
        self.migrations = Counter("singularity_migrations_total",
                                  "Jobs moved between clusters", ["source", "destination"],
                                  registry=self.registry)
        self.migrating = Gauge("singularity_migrations_in_flight",
                               "Migrations under way", registry=self.registry)

    def serve(self, port: int) -> None:
        from prometheus_client import start_http_server

        start_http_server(port, addr="127.0.0.1", registry=self.registry)


class FederationPlacer:
    """Observe every member, place, narrow, move: one pass per period.

    With ``moves`` (and a journal) it also moves running jobs to make room
    for a higher tier (``fedmoves.plan_moves``): the move is journaled
    before the job is signalled, so a placer killed after the signal finds
    it and signals again (the runtime takes a second signal as the first),
    and every later step is journaled as it is done (``migrate.advance``).
    """

    def __init__(self, members: Sequence[Member], policy: Policy, *, period_s: float = 2.0,
                 dry_run: bool = False, clock: Callable[[], float] = time.time,
                 journal_path: Path | None = None, cost: MoveCost = MoveCost(),
                 moves: "MoveSettings | None" = None) -> None:
        if not members:
            raise ValueError("--federation names no member cluster")
        if not 0.2 <= period_s <= 3600:
            raise ValueError(f"--period must be between 0.2 and 3600 s, not {period_s}")
        self.members = tuple(members)
        self.by_name = {m.name: m for m in self.members}
        self.policy = policy
        self.period_s = period_s
        self.dry_run = dry_run
        self.clock = clock
        self.cost = cost
        self.metrics = PlacerMetrics()
        self._stop = threading.Event()
        from .migrate import MigrationJournal
        #: migrations in flight; None = the placer moves no checkpoint
        self.journal = MigrationJournal(journal_path) if journal_path else None
        #: moves of running jobs; None = only jobs Slurm requeued are moved
        self.moves = moves if self.journal is not None else None
        #: migrations whose job this process has signalled (a restarted
        #: placer signals a running one again)
        self._signalled: set[int] = set()
        #: jobs whose move this process gave up (never requeued): not moved again
        self._given_up: set[int] = set()

    def stop(self, reason: str) -> None:
        log.info("stopping: %s", reason)
        self._stop.set()

    def run(self, max_passes: int = 0) -> int:
        passes = 0
        while not self._stop.is_set():
            try:
                self.run_pass()
            except SlurmError as exc:
                log.warning("pass failed, retrying next period: %s", exc)
            passes += 1
            if max_passes and passes >= max_passes:
                break
            self._stop.wait(self.period_s)
        return 0

    def run_pass(self) -> list[Placement]:
        """One pass; returns the placements carried out.

        :raises SlurmError: a member could not be read.
        """
        in_flight = self._continue_migrations()
        seen = observe_federation(self.members, self.policy, self.clock())
        done = []
        pending = [j for j in seen.pending if j.job_id not in in_flight]
        placements = place(seen.states, pending, self.cost)
        for p in placements:
            member = self.by_name.get(seen.origin.get(p.job_id, ""), self.members[0])
            if self.dry_run:
                log.info("[job %s] would place on %s: %s", p.job_id, p.cluster, p.reason)
                continue
            if p.migrate_from is not None:
                if self.journal is None:
                    continue              # no journal: never move a checkpoint
                self._start_migration(p, self.journal)
                done.append(p)
                continue
            try:
                member.client.scontrol("update", f"JobId={p.job_id}", f"Clusters={p.cluster}")
            except SlurmError as exc:
                self.metrics.errors.labels(member.name).inc()
                log.warning("[job %s] placing on %s failed: %s", p.job_id, p.cluster, exc)
                continue
            self.metrics.placements.labels(p.cluster).inc()
            log.info("[job %s] placed on %s: %s", p.job_id, p.cluster, p.reason)
            done.append(p)
        if self.moves is not None and self.journal is not None:
            self._move_running(seen, pending, placements, self.journal)
        self._update_gauges(seen.states)
        return done

    def _move_running(self, seen: Observed, pending: list[PendingJob],
                      placements: Sequence[Placement], journal) -> None:
        """Move running jobs to make room for a higher tier (``plan_moves``)."""
        from .fedmoves import Leaving, plan_moves

        placed = {p.job_id for p in placements}
        if not any(not j.held and j.job_id not in placed for j in pending):
            return                      # no job waits: nothing to make room for
        checkpoints = {}
        for m in self.members:
            for job in seen.states[m.name].jobs:
                if job.devices and job.job_id not in self._given_up:
                    size = checkpoint_bytes(m, job.job_id)
                    if size is not None:
                        checkpoints[job.job_id] = size
        shapes = {j.job_id: (j.nodes, j.gpus_per_node) for j in seen.pending}
        for state in seen.states.values():
            for job in state.jobs:
                if job.placement:
                    shapes[job.job_id] = (len(job.placement), max(g for _, g in job.placement))
        leaving = [Leaving(e.job_id, e.source, e.destination, *shapes[e.job_id])
                   for e in journal.load().values() if e.job_id in shapes]
        now = self.clock()
        for mv in plan_moves(seen.states, pending, placements, checkpoints, leaving,
                             self.policy, now, self.cost, self.moves):
            if self.dry_run:
                log.info("[job %s] would move %s -> %s: %s", mv.job_id, mv.source,
                         mv.destination, mv.reason)
                continue
            from .migrate import InFlight, MigrationStep

            entry = InFlight(mv.job_id, mv.source, mv.destination,
                             str(federated_checkpoint_dir(mv.job_id)), MigrationStep.SIGNALLED,
                             now)
            journal.put(entry)          # before the signal: a restart finds the move
            self.metrics.migrations.labels(mv.source, mv.destination).inc()
            log.info("[job %s] migrating %s -> %s: %s", mv.job_id, mv.source, mv.destination,
                     mv.reason)
            self._signal(entry)

    def _signal(self, entry) -> None:
        """Ask the job of a migration to checkpoint and requeue (its tier's
        signal), if it still runs on its source.

        :raises SlurmError: squeue or scancel failed.
        """
        source = self.by_name[entry.source]
        for job in source.client.jobs():
            if job.job_id == entry.job_id and job.state == "RUNNING":
                tier = self.policy.tier_of_partition(job.partition) or self.policy.defaults.tier
                signal = self.policy.tiers[tier].signal
                source.client.cancel(job.job_id, signal=signal)
                log.info("[job %s] sent SIG%s; waiting for its checkpoint and requeue",
                         job.job_id, signal)
        self._signalled.add(entry.job_id)

    def _start_migration(self, p: Placement, journal) -> None:
        from .migrate import InFlight, MigrationStep

        entry = InFlight(p.job_id, p.migrate_from or "", p.cluster,
                         str(federated_checkpoint_dir(p.job_id)), MigrationStep.SIGNALLED,
                         self.clock())
        journal.put(entry)              # before any step: a restart resumes it
        self._signalled.add(p.job_id)   # Slurm requeued it: nothing to signal
        self.metrics.migrations.labels(entry.source, entry.destination).inc()
        log.info("[job %s] migrating %s -> %s: %s", p.job_id, entry.source, p.cluster, p.reason)
        self._advance(entry, journal)

    def _continue_migrations(self) -> set[int]:
        """Advance every migration in flight; returns their job ids."""
        from .migrate import MigrationStep

        if self.journal is None:
            return set()
        entries = self.journal.load()
        for entry in entries.values():
            if entry.step is MigrationStep.SIGNALLED and entry.job_id not in self._signalled:
                try:
                    self._signal(entry)     # journaled by a placer that died: again
                except (SlurmError, KeyError) as exc:
                    log.warning("[job %s] signalling it again failed: %s", entry.job_id, exc)
            self._advance(entry, self.journal)
        left = self.journal.load()
        self.metrics.migrating.set(len(left))
        return set(entries)

    def _advance(self, entry, journal) -> None:
        from .fedmoves import MoveSettings
        from .migrate import MigrationError, MigrationStep, advance

        source, dest = self.by_name.get(entry.source), self.by_name.get(entry.destination)
        if source is None or dest is None:
            log.warning("[job %s] migration %s -> %s names a cluster not in the federation; "
                        "dropped", entry.job_id, entry.source, entry.destination)
            journal.drop(entry.job_id)
            return
        try:
            after = advance(entry, source, dest, lambda msg: log.info("%s", msg),
                            record=journal.put)
        except SlurmError as exc:
            self.metrics.errors.labels(source.name).inc()
            log.warning("[job %s] migration step after %s failed, retrying next pass: %s",
                        entry.job_id, entry.step.value, exc)
            return
        except (MigrationError, OSError) as exc:
            log.warning("[job %s] migration %s -> %s abandoned: %s; releasing it where it "
                        "was", entry.job_id, entry.source, entry.destination, exc)
            try:
                source.client.scontrol("release", str(entry.job_id))
            except SlurmError:
                pass
            journal.drop(entry.job_id)
            return
        if after is None:
            journal.drop(entry.job_id)
            log.info("[job %s] migrated %s -> %s", entry.job_id, entry.source, entry.destination)
        elif after != entry:
            journal.put(after)
        elif (entry.step is MigrationStep.SIGNALLED
              and self.clock() - entry.since > (self.moves or MoveSettings()).requeue_timeout_s):
            log.warning("[job %s] not requeued %.0f s after its signal; move %s -> %s given "
                        "up, the job runs on where it is", entry.job_id,
                        self.clock() - entry.since, entry.source, entry.destination)
            self._given_up.add(entry.job_id)
            journal.drop(entry.job_id)

    def _update_gauges(self, states: Mapping[str, ClusterState]) -> None:
        m = self.metrics
        m.gpus_busy.clear()
        m.jobs.clear()
        for name, state in states.items():
            m.gpus_free.labels(name).set(state.free_gpus)
            busy = {t.value: 0 for t in self.policy.tiers}
            count = dict.fromkeys(busy, 0)
            for job in state.jobs:
                busy[job.tier.value] = busy.get(job.tier.value, 0) + job.devices
                count[job.tier.value] = count.get(job.tier.value, 0) + 1
            for tier in busy:
                m.gpus_busy.labels(name, tier).set(busy[tier])
                m.jobs.labels(name, tier).set(count[tier])
        m.account_gpus.clear()
        for account, gpus in account_usage(states).items():
            m.account_gpus.labels(account).set(gpus)
