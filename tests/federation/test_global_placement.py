"""Global placement over a real local federation: the placer
(`singularity-schedd --federation`) narrows each pending federated job to
the cluster with room, or to the one whose storage holds its checkpoint, and
a second pass (or a restarted placer) places nothing again. The decision
itself (``place``) is checked on shapes without a cluster."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from slurm_singularity.policy.api import Tier
from slurm_singularity.sched.api import ClusterState, JobPhase, JobState, NodeState
from slurm_singularity.sched.federation import (MoveCost, PendingJob, Placement,
                                                account_usage, federated_checkpoint_dir, place)

SCHEDD = [sys.executable, "-m", "slurm_singularity.cli.schedd"]


def cluster(free: list[int], gpus: int = 8, running: tuple[tuple[str, int], ...] = ()
            ) -> ClusterState:
    jobs = tuple(JobState(job_id=100 + i, tier=Tier.STANDARD, account=acc, world_size=n,
                          min_devices=n, max_devices=n, phase=JobPhase.RUNNING,
                          submit_time=0.0, devices=n) for i, (acc, n) in enumerate(running))
    return ClusterState(0.0, tuple(NodeState(f"n{i + 1}", gpus, f) for i, f in enumerate(free)),
                        jobs)


def pending(job_id: int, gpus: int, *, tier: Tier = Tier.STANDARD, account: str = "a",
            viable: tuple[str, ...] = ("east", "west"), ckpt: str | None = None,
            submit: float = 0.0, nodes: int = 1, ckpt_bytes: int = 0) -> PendingJob:
    return PendingJob(job_id, tier, account, nodes, gpus, submit, viable, ckpt, ckpt_bytes)


# -- the decision, on shapes -----------------------------------------------------

def test_a_pending_job_goes_to_the_cluster_with_room():
    members = {"east": cluster([0, 0]), "west": cluster([8, 8])}
    (p,) = place(members, [pending(1, 8)])
    assert (p.job_id, p.cluster) == (1, "west")
    assert "room" in p.reason


def test_a_job_goes_where_its_checkpoint_lies_even_with_more_room_elsewhere():
    members = {"east": cluster([8, 0]), "west": cluster([8, 8])}
    (p,) = place(members, [pending(1, 4, ckpt="east")])
    assert p == Placement(1, "east", "its checkpoint lies in east's storage")


def test_a_job_no_cluster_has_room_for_is_left_to_slurm():
    members = {"east": cluster([2, 2]), "west": cluster([4, 4])}
    assert place(members, [pending(1, 8)]) == ()


def test_jobs_placed_in_one_pass_share_out_the_room_instead_of_all_taking_the_emptiest():
    members = {"east": cluster([8, 8]), "west": cluster([8, 8, 8])}
    placed = {p.job_id: p.cluster for p in place(members, [pending(i, 8, submit=i)
                                                             for i in range(1, 6)])}
    assert sorted(placed.values()) == ["east", "east", "west", "west", "west"]


def test_premium_is_placed_before_an_older_basic_job():
    members = {"east": cluster([0]), "west": cluster([8])}
    placed = place(members, [pending(1, 8, tier=Tier.BASIC, submit=0),
                             pending(2, 8, tier=Tier.PREMIUM, submit=5)])
    assert [p.job_id for p in placed] == [2]


def test_fair_share_counts_an_accounts_gpus_on_every_cluster():
    # account "a" holds 8 GPUs on east, "b" 4 on west: across the federation
    # "b" holds fewer, so its job gets the one free slot first, although on
    # west alone "a" holds none
    members = {"east": cluster([0], running=(("a", 8),)),
               "west": cluster([4, 4], running=(("b", 4),))}
    assert account_usage(members) == {"a": 8, "b": 4}
    placed = place(members, [pending(1, 4, account="a", submit=0),
                             pending(2, 4, account="b", submit=9)])
    assert [p.job_id for p in placed] == [2, 1]


def test_a_job_already_narrowed_is_not_placed_again_but_takes_its_room():
    members = {"east": cluster([8]), "west": cluster([8])}
    placed = place(members, [pending(1, 8, viable=("west",), submit=0),
                             pending(2, 8, submit=1)])
    assert placed == (Placement(2, "east", placed[0].reason),)


# -- on the real federation ------------------------------------------------------

def placer_pass(fed) -> subprocess.CompletedProcess:
    r = subprocess.run([*SCHEDD, "--federation", str(fed.spec.state_dir), "--once"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def submit(fed, member: str, *args: str) -> int:
    out = fed.run(member, "sbatch", "--parsable", *args).stdout
    return int(out.strip().split(";")[0])


@pytest.mark.cluster
def test_a_pending_job_is_placed_on_the_cluster_with_room_and_runs_there(fed, tmp_path):
    filler = submit(fed, "east", "--clusters=east", "-N2", "--gres=gpu:8", "-o", "/dev/null",
                    "--wrap", "sleep 300")
    fed.wait_until(lambda: fed.running_on(filler) == "east", "the filler to run on east")
    job = submit(fed, "east", "-H", "--gres=gpu:4", "-o", str(tmp_path / "out"),
                 "--wrap", "echo $SLURM_CLUSTER_NAME")
    assert "FedViableSiblings=east,west" in fed.show("east", job)

    r = placer_pass(fed)
    assert f"[job {job}] placed on west: west has room" in r.stderr
    assert "FedViableSiblings=west " in fed.show("east", job)
    fed.run("east", "scontrol", "release", str(job))
    fed.wait_until(lambda: (tmp_path / "out").exists() and (tmp_path / "out").read_text(),
                   "the job's output")
    assert (tmp_path / "out").read_text().strip() == "west"


@pytest.mark.cluster
def test_a_job_is_placed_where_its_checkpoint_lies_and_a_second_pass_leaves_it(fed):
    storage = fed.member("west").storage_root
    job = submit(fed, "east", "-H", "--gres=gpu:2", "-o", f"{storage}/out-%j",
                 "--wrap", "echo $SLURM_CLUSTER_NAME")
    ckpt = storage / federated_checkpoint_dir(job)
    ckpt.mkdir(parents=True)
    (ckpt / "step-00000010").write_text("checkpoint")
    out = storage / f"out-{job}"

    r = placer_pass(fed)
    assert f"[job {job}] placed on west: its checkpoint lies in west's storage" in r.stderr
    assert "FedViableSiblings=west " in fed.show("east", job)
    again = placer_pass(fed)       # a restarted placer: the decision is Slurm's now
    assert f"[job {job}]" not in again.stderr
    fed.run("east", "scontrol", "release", str(job))
    fed.wait_until(lambda: out.exists() and out.read_text(), "the job's output")
    assert out.read_text().strip() == "west"


@pytest.mark.cluster
def test_a_job_placed_on_its_origin_leaves_a_revoked_copy_that_every_reader_survives(fed):
    filler = submit(fed, "west", "--clusters=west", "-N2", "--gres=gpu:8", "-o", "/dev/null",
                    "--wrap", "sleep 300")
    fed.wait_until(lambda: fed.running_on(filler) == "west", "the filler to run on west")
    job = submit(fed, "east", "--begin=now+300", "--gres=gpu:1", "-o", "/dev/null",
                 "--wrap", "sleep 300")
    r = placer_pass(fed)
    assert f"[job {job}] placed on east" in r.stderr
    # west now holds a revoked copy of the job (squeue --json: "job_id": null)
    records = json.loads(fed.run("west", "squeue", "--all", "--json").stdout)["jobs"]
    assert any(j["job_state"] == "REVOKED" for j in records), records
    again = placer_pass(fed)
    assert "Traceback" not in again.stderr and f"[job {job}]" not in again.stderr


def test_a_job_whose_checkpoint_cluster_is_full_is_moved_where_there_is_room():
    members = {"east": cluster([0, 0]), "west": cluster([8, 8])}
    (p,) = place(members, [pending(1, 8, ckpt="east")])
    assert (p.cluster, p.migrate_from) == ("west", "east")
    assert "copy it there" in p.reason


def test_a_job_whose_checkpoint_cluster_is_full_stays_when_no_cluster_has_room():
    members = {"east": cluster([0, 0]), "west": cluster([4, 4])}
    (p,) = place(members, [pending(1, 8, ckpt="east")])
    assert (p.cluster, p.migrate_from) == ("east", None)


def test_a_move_whose_copy_would_take_too_long_is_not_made():
    members = {"east": cluster([0, 0]), "west": cluster([8, 8])}
    cost = MoveCost(bytes_per_s=1e6, max_copy_s=30)
    (small,) = place(members, [pending(1, 8, ckpt="east", ckpt_bytes=10_000_000)], cost)
    assert (small.cluster, small.migrate_from) == ("west", "east")
    assert "10000000 bytes, ~10.0 s" in small.reason
    (big,) = place(members, [pending(1, 8, ckpt="east", ckpt_bytes=60_000_000)], cost)
    assert (big.cluster, big.migrate_from) == ("east", None)


@pytest.mark.parametrize("field, kwargs", [("bytes_per_s", {"bytes_per_s": 0}),
                                           ("max_copy_s", {"max_copy_s": -1})])
def test_a_bad_move_cost_is_refused_naming_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        MoveCost(**kwargs)
