"""The placer's decision to move a *running* job to another cluster of the
federation to make room for a higher tier (``fedmoves.plan_moves``), on
hand-made federations: which job, to where, when not (hysteresis, no
checkpoint where it runs, a copy too long, no room elsewhere, a tier that
may not take from it), and never twice for one need."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slurm_singularity import paths
from slurm_singularity.policy.api import Tier
from slurm_singularity.policy.load import load_policy
from slurm_singularity.sched.api import ClusterState, JobPhase, JobState, NodeState
from slurm_singularity.sched.federation import MoveCost, PendingJob, Placement
from slurm_singularity.sched.fedmoves import Leaving, Move, MoveSettings, plan_moves

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


@pytest.mark.parametrize("flag, value, field", [("--min-run", "-1", "min_run_s"),
                                                ("--requeue-timeout", "0", "requeue_timeout_s")])
def test_bad_move_settings_are_refused_naming_the_flag(tmp_path, flag, value, field):
    r = subprocess.run([sys.executable, "-m", "slurm_singularity.cli.schedd", "--federation",
                        str(tmp_path), flag, value], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert f"error: {field} ({flag}) must be a number of seconds" in r.stderr
