"""The placer moves a *running* job to another cluster of the federation to
make room for a higher tier. The decision (``fedmoves.plan_moves``) on
hand-made federations: which job, to where, when not (hysteresis, no
checkpoint where it runs, a copy too long, no room elsewhere, a tier that
may not take from it), and never twice for one need. The placer on a fake
federation: killed after any Slurm call of a move, a new one finishes it
once. On the real federation: test_moves_on_the_real_federation.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from slurm_singularity import paths
from slurm_singularity.policy.api import Tier
from slurm_singularity.policy.load import load_policy
from slurm_singularity.sched.api import ClusterState, JobPhase, JobState, NodeState
from slurm_singularity.sched.federation import FederationPlacer
from slurm_singularity.sched.federation import Member as FedMember
from slurm_singularity.sched.federation import (MoveCost, PendingJob, Placement,
                                                federated_checkpoint_dir)
from slurm_singularity.sched.fedmoves import Leaving, Move, MoveSettings, plan_moves
from slurm_singularity.sched.migrate import InFlight, MigrationJournal, MigrationStep
from slurm_singularity.slurm.api import Job, Node

POLICY = load_policy(paths.TEMPLATES_DIR / "policy.toml")
NOW = 10_000.0
LONG_AGO = NOW - 3600


def running(job_id: int, node: str, gpus: int = 8, *, tier: Tier = Tier.BASIC,
            started: float = LONG_AGO, nodes: tuple[str, ...] = ()) -> JobState:
    where = tuple((n, gpus) for n in (nodes or (node,)))
    total = gpus * len(where)
    return JobState(job_id=job_id, tier=tier, account="default", world_size=total,
                    min_devices=total, max_devices=total, phase=JobPhase.RUNNING,
                    submit_time=0.0, devices=total, placement=where, sized_at=started)


def member(free: dict[str, int], *jobs: JobState, gpus: int = 8) -> ClusterState:
    return ClusterState(NOW, tuple(NodeState(n, gpus, f) for n, f in free.items()), jobs)


def need(job_id: int = 1, nodes: int = 2, *, tier: Tier = Tier.PREMIUM,
         viable: tuple[str, ...] = ("east",), held: bool = False) -> PendingJob:
    return PendingJob(job_id, tier, "research", nodes, 8, NOW - 5, viable, held=held)


def moves(members, pending, checkpoints, *, placed=(), in_flight=(), cost=MoveCost(),
          min_run_s: float = 600.0) -> tuple[Move, ...]:
    return plan_moves(members, pending, placed, checkpoints, in_flight, POLICY, NOW, cost,
                      MoveSettings(min_run_s=min_run_s))


def full_east(*extra: JobState) -> dict[str, ClusterState]:
    """east: a basic job (10) on n1, n2 idle; west: empty."""
    return {"east": member({"n1": 0, "n2": 8}, running(10, "n1"), *extra),
            "west": member({"n3": 8, "n4": 8})}


def test_a_running_basic_job_moves_to_the_cluster_with_room_for_a_premium_job():
    (mv,) = moves(full_east(), [need()], {10: 500_000})
    assert (mv.job_id, mv.source, mv.destination, mv.for_job) == (10, "east", "west", 1)
    assert "makes room on east for job 1 (premium, 2x8 GPUs)" in mv.reason
    assert "copy 500000 bytes" in mv.reason


def test_nothing_moves_when_no_other_cluster_has_room():
    members = full_east()
    members["west"] = member({"n3": 4, "n4": 4})
    assert moves(members, [need()], {10: 500_000}) == ()


def test_a_job_started_less_than_min_run_ago_is_not_moved():
    members = {"east": member({"n1": 0, "n2": 8}, running(10, "n1", started=NOW - 30)),
               "west": member({"n3": 8, "n4": 8})}
    assert moves(members, [need()], {10: 1}) == ()
    assert [m.job_id for m in moves(members, [need()], {10: 1}, min_run_s=20)] == [10]


def test_a_job_without_a_checkpoint_where_it_runs_is_not_moved():
    assert moves(full_east(), [need()], {}) == ()


def test_a_job_whose_copy_takes_longer_than_max_copy_is_not_moved():
    cost = MoveCost(bytes_per_s=1e6, max_copy_s=30)
    assert moves(full_east(), [need()], {10: 31_000_000}, cost=cost) == ()
    (mv,) = moves(full_east(), [need()], {10: 29_000_000}, cost=cost)
    assert "~29.0 s" in mv.reason


def test_the_job_with_the_smaller_checkpoint_moves_and_only_as_many_as_the_need_takes():
    members = {"east": member({"n1": 0, "n2": 0}, running(10, "n1"), running(11, "n2")),
               "west": member({"n3": 8, "n4": 8})}
    (mv,) = moves(members, [need(nodes=1)], {10: 900, 11: 300})
    assert mv.job_id == 11
    both = moves(members, [need(nodes=2)], {10: 900, 11: 300})
    assert sorted(m.job_id for m in both) == [10, 11]
    assert {m.destination for m in both} == {"west"}


def test_a_tier_moves_only_jobs_its_policy_lets_it_preempt():
    members = {"east": member({"n1": 0, "n2": 8}, running(10, "n1", tier=Tier.STANDARD)),
               "west": member({"n3": 8, "n4": 8})}
    assert [m.job_id for m in moves(members, [need()], {10: 1})] == [10]    # premium > standard
    assert moves(members, [need(tier=Tier.STANDARD)], {10: 1}) == ()
    members["east"] = member({"n1": 0, "n2": 8}, running(10, "n1", tier=Tier.PREMIUM))
    assert moves(members, [need()], {10: 1}) == ()                          # never preempted


def test_a_need_that_fits_once_a_migration_in_flight_leaves_gets_no_second_move():
    members = {"east": member({"n1": 0, "n2": 0}, running(10, "n1"), running(11, "n2")),
               "west": member({"n3": 8, "n4": 8})}
    (first,) = moves(members, [need(nodes=1)], {10: 1, 11: 1})
    leaving = Leaving(first.job_id, "east", "west", 1, 8)
    assert moves(members, [need(nodes=1)], {10: 1, 11: 1}, in_flight=[leaving]) == ()


def test_a_job_already_leaving_is_not_chosen_again_for_another_need():
    members = {"east": member({"n1": 0, "n2": 0}, running(10, "n1"), running(11, "n2")),
               "west": member({"n3": 8, "n4": 8})}
    leaving = Leaving(10, "east", "west", 1, 8)
    (mv,) = moves(members, [need(1, nodes=2)], {10: 1, 11: 1}, in_flight=[leaving])
    assert mv.job_id == 11


def test_nothing_moves_for_a_need_that_moving_every_candidate_would_not_satisfy():
    members = {"east": member({"n1": 0, "n2": 0}, running(10, "n1"),
                              running(11, "n2", tier=Tier.PREMIUM)),
               "west": member({"n3": 8, "n4": 8})}
    assert moves(members, [need(nodes=2)], {10: 1, 11: 1}) == ()


def test_a_held_job_and_one_placed_this_pass_are_no_need():
    assert moves(full_east(), [need(held=True)], {10: 1}) == ()
    placed = [Placement(1, "east", "test")]
    assert moves(full_east(), [need()], {10: 1}, placed=placed) == ()


def test_room_taken_on_the_destination_is_not_promised_twice():
    members = {"east": member({"n1": 0, "n2": 0}, running(10, "n1"), running(11, "n2")),
               "south": member({"n5": 0, "n6": 0}, running(20, "n5"), running(21, "n6")),
               "west": member({"n3": 8, "n4": 0})}
    got = moves(members, [need(1, nodes=1, viable=("east",)),
                          need(2, nodes=1, viable=("south",))], {10: 1, 11: 1, 20: 1, 21: 1})
    assert len(got) == 1 and got[0].for_job == 1


class FakeMember:
    """What the placer asks of one member's Slurm, answered from lists; the
    calls that change something are recorded."""

    def __init__(self, nodes: dict[str, int], jobs: list[Job]) -> None:
        self.env = {}
        self._nodes = [Node(n, "mixed", g, 16) for n, g in nodes.items()]
        self._jobs = jobs
        self.calls: list[tuple[str, ...]] = []

    def nodes(self) -> list[Node]:
        return self._nodes

    def jobs(self) -> list[Job]:
        return self._jobs

    def cancel(self, *job_ids: int, signal: str | None = None, full: bool = False) -> None:
        self.calls.append(("scancel", f"--signal={signal}", *map(str, job_ids)))

    def scontrol(self, *args: str) -> str:
        self.calls.append(("scontrol", *args))
        return ""


def basic_running_on_east(job_id: int = 10) -> Job:
    return Job(job_id, "train", "RUNNING", "basic", "default", "root", "n1", gpus=8,
               placement=(("n1", 8),), node_count=1, start_time=NOW - 3600,
               submit_time=NOW - 3700, federation_origin="east",
               federation_siblings_viable=("east",))


def premium_needs_east(tmp_path) -> tuple[FakeMember, FakeMember]:
    """east: basic job 10 running on n1 (its checkpoint in east's storage),
    premium job 11 pending for all of east; west: empty."""
    east = FakeMember({"n1": 8, "n2": 8}, [
        basic_running_on_east(),
        Job(11, "prem", "PENDING", "premium", "research", "root", "", gpus=16, node_count=2,
            submit_time=NOW - 10, federation_origin="east", federation_siblings_viable=("east",))])
    west = FakeMember({"n3": 8, "n4": 8}, [])
    (tmp_path / "east" / federated_checkpoint_dir(10)).mkdir(parents=True)
    (tmp_path / "east" / federated_checkpoint_dir(10) / "step").write_bytes(b"x" * 1000)
    return east, west


def placer_on(tmp_path, east: FakeMember, west: FakeMember, clock) -> FederationPlacer:
    members = [FedMember("east", east, tmp_path / "east"), FedMember("west", west, tmp_path / "west")]
    return FederationPlacer(members, POLICY, clock=clock, journal_path=tmp_path / "migrations.json",
                            moves=MoveSettings(min_run_s=60, requeue_timeout_s=300))


def test_a_restarted_placer_signals_a_journaled_move_once_and_gives_it_up_if_never_requeued(
        tmp_path):
    """A placer killed between journaling a move and signalling the job:
    the next one signals it (once, not every pass); a job that never
    requeues is left where it runs after --requeue-timeout and not chosen
    again, although the need is still there."""
    east, west = premium_needs_east(tmp_path)
    journal = MigrationJournal(tmp_path / "migrations.json")
    journal.put(InFlight(10, "east", "west", str(federated_checkpoint_dir(10)),
                         MigrationStep.SIGNALLED, NOW))
    now = [NOW + 1]
    placer = placer_on(tmp_path, east, west, lambda: now[0])
    placer.run_pass()
    placer.run_pass()
    assert east.calls == [("scancel", "--signal=TERM", "10")]
    assert journal.load()[10].step is MigrationStep.SIGNALLED
    now[0] = NOW + 301
    placer.run_pass()
    assert journal.load() == {}
    placer.run_pass()
    assert east.calls == [("scancel", "--signal=TERM", "10")]       # not chosen again


def test_a_placer_journals_a_move_before_it_signals_the_job(tmp_path):
    east, west = premium_needs_east(tmp_path)
    journal = MigrationJournal(tmp_path / "migrations.json")
    seen = []
    east.cancel = lambda *ids, signal=None, full=False: seen.append(dict(journal.load()))
    placer_on(tmp_path, east, west, lambda: NOW).run_pass()
    assert [list(j) for j in seen] == [[10]]
    assert seen[0][10].destination == "west"


class Killed(BaseException):
    """The placer's process died here (nothing in it catches this)."""


class FakeFederation:
    """Two members, east and west (2 nodes x 8 GPUs each), as Slurm 22.05
    behaved on the local federation for a move: a signalled runtime job
    checkpoints (here: writes ``step``) and is requeued on the next tick,
    eligible again two ticks later (Slurm's requeue delay); ``hold``,
    ``update Clusters=X`` (its live copy moves to X) and ``release`` act at
    once; pending jobs not held start on their cluster's free nodes, premium
    first. ``kill_after`` kills the placer right after
    its Nth call that changes something."""

    def __init__(self, root: Path, kill_after: int | None = None) -> None:
        self.root = root
        self.kill_after = kill_after
        self.changes: list[tuple[str, ...]] = []
        self.jobs = {
            11: dict(where="east", state="PENDING", node="", held=False, tier="premium",
                     gpus=16, nodes=2, restarts=0, signalled=False, delay=0),
            10: dict(where="east", state="RUNNING", node="n1", held=False, tier="basic",
                     gpus=8, nodes=1, restarts=0, signalled=False, delay=0)}
        self.ckpt(10, "east").mkdir(parents=True)
        (self.ckpt(10, "east") / "step").write_text("step 4\n")

    def ckpt(self, job_id: int, cluster: str) -> Path:
        return self.root / cluster / federated_checkpoint_dir(job_id)

    def client(self, cluster: str) -> "FakeFederation.Client":
        return FakeFederation.Client(self, cluster)

    def tick(self) -> None:
        for job_id, j in self.jobs.items():
            if j["state"] == "RUNNING" and j["signalled"]:
                (self.ckpt(job_id, j["where"]) / "step").write_text("step 9\n")
                j.update(state="PENDING", node="", signalled=False, restarts=j["restarts"] + 1,
                         delay=3)
        for j in self.jobs.values():            # premium first
            j["delay"] = max(0, j["delay"] - 1)
            if j["state"] == "PENDING" and not j["held"] and not j["delay"]:
                free = [n for n in self.nodes(j["where"]) if n not in self.busy(j["where"])]
                if len(free) >= j["nodes"]:
                    j.update(state="RUNNING", node=",".join(free[:j["nodes"]]))

    def nodes(self, cluster: str) -> list[str]:
        return ["n1", "n2"] if cluster == "east" else ["n3", "n4"]

    def busy(self, cluster: str) -> set[str]:
        return {n for j in self.jobs.values() if j["where"] == cluster and j["node"]
                for n in j["node"].split(",")}

    def change(self, *call: str) -> None:
        self.changes.append(call)
        if self.kill_after is not None and len(self.changes) == self.kill_after:
            raise Killed(call)

    class Client:
        def __init__(self, fed: "FakeFederation", cluster: str) -> None:
            self.fed, self.cluster, self.env = fed, cluster, {}

        def nodes(self) -> list[Node]:
            return [Node(n, "mixed", 8, 16) for n in self.fed.nodes(self.cluster)]

        def jobs(self) -> list[Job]:
            out = []
            for job_id, j in self.fed.jobs.items():
                if j["where"] != self.cluster:
                    continue
                running = j["state"] == "RUNNING"
                out.append(Job(
                    job_id, "j", j["state"], j["tier"], "research", "root", j["node"],
                    reason="JobHeldAdmin" if j["held"] else "BeginTime" if j["delay"] else "None",
                    gpus=j["gpus"],
                    placement=tuple((n, 8) for n in j["node"].split(",")) if running else (),
                    node_count=j["nodes"], start_time=NOW - 3600 if running else 0.0,
                    submit_time=NOW - 3700, restart_count=j["restarts"],
                    federation_origin="east", federation_siblings_viable=(self.cluster,)))
            return out

        def cancel(self, *job_ids: int, signal: str | None = None, full: bool = False) -> None:
            for job_id in job_ids:
                if self.fed.jobs[job_id]["state"] == "RUNNING":
                    self.fed.jobs[job_id]["signalled"] = True
            self.fed.change("signal", *map(str, job_ids))

        def scontrol(self, *args: str) -> str:
            if args[0] in ("hold", "release"):
                self.fed.jobs[int(args[1])]["held"] = args[0] == "hold"
            elif args[0] == "update":
                job_id = int(args[1].split("=")[1])
                self.fed.jobs[job_id]["where"] = args[2].split("=")[1]
            self.fed.change(*args)
            return ""


def settle(fed: FakeFederation, tmp_path: Path, passes: int = 12) -> list[str]:
    """Run placers pass after pass, a new one after each kill; returns
    where job 10 ran, tick by tick."""
    seen = []
    placer = None
    for _ in range(passes):
        if fed.jobs[10]["state"] == "RUNNING":
            seen.append(fed.jobs[10]["where"])
        if placer is None:
            members = [FedMember(c, fed.client(c), tmp_path / c) for c in ("east", "west")]
            placer = FederationPlacer(members, POLICY, clock=lambda: NOW,
                                      journal_path=tmp_path / "migrations.json",
                                      moves=MoveSettings(min_run_s=60))
        try:
            placer.run_pass()
        except Killed:
            placer = None               # a fresh process, the same journal and Slurm
        fed.tick()
    return seen


def test_the_move_runs_through_without_a_kill(tmp_path):
    fed = FakeFederation(tmp_path)
    ran = settle(fed, tmp_path)
    assert ran[0] == "east" and ran[-1] == "west"
    assert [c[0] for c in fed.changes] == ["signal", "hold", "update", "release"]


@pytest.mark.parametrize("kill_after", [1, 2, 3, 4])
def test_a_placer_killed_after_any_slurm_call_of_a_move_finishes_it_once_from_the_checkpoint(
        tmp_path, kill_after):
    fed = FakeFederation(tmp_path, kill_after)
    ran = settle(fed, tmp_path)
    assert ran[-1] == "west" and fed.jobs[11]["state"] == "RUNNING"
    assert ran.count("east") == ran.index("west")        # east, then west, never back
    calls = [c[0] for c in fed.changes]
    # one move: the job signalled once; only the call the killed placer made
    # but had not journaled yet is made again (each is idempotent in Slurm)
    assert calls.count("signal") == 1
    assert calls.count("hold") == 1 + (kill_after == 2)
    assert calls.count("update") == 1 + (kill_after == 3)
    assert calls.count("release") == 1 + (kill_after == 4)
    assert (fed.ckpt(10, "west") / "step").read_text() == "step 9\n"
    assert MigrationJournal(tmp_path / "migrations.json").load() == {}


@pytest.mark.parametrize("flag, value, field", [("--min-run", "-1", "min_run_s"),
                                                ("--requeue-timeout", "0", "requeue_timeout_s")])
def test_bad_move_settings_are_refused_naming_the_flag(tmp_path, flag, value, field):
    r = subprocess.run([sys.executable, "-m", "slurm_singularity.cli.schedd", "--federation",
                        str(tmp_path), flag, value], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert f"error: {field} ({flag}) must be a number of seconds" in r.stderr
