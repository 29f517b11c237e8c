"""The federation simulator on hand-made federations where each policy's choice is checkable.

Expected times come from the spec's bandwidths and ``sched/sim/constants.py``
(never typed in), so a re-measured constant keeps the tests meaningful.
"""

from __future__ import annotations

import pytest

from slurm_singularity.policy.api import Tier
from slurm_singularity.sched.api import PlannerSettings
from slurm_singularity.sched.sim import constants as C
from slurm_singularity.sched.sim.federation import (MIGRATE_KEEP, Federation, FedJob, Routing,
                                                     home_clusters, simulate_federation)
from slurm_singularity.sched.sim.fedspec import (ClusterSpec, FederationSpec, FedSpecError,
                                                  load_federation, parse_federation, uniform)
from slurm_singularity.sched.sim.policies import reference_policy
from slurm_singularity.sched.sim.trace import TraceJob

POLICY = reference_policy()


def job(k: int, at: float, run: float, gpus: int, tier: Tier) -> TraceJob:
    """A rigid job (MIN = MAX = W)."""
    return TraceJob(k, at, run, gpus, "default", tier, gpus, gpus)


def run(spec: FederationSpec, jobs: list[TraceJob], routing: Routing,
        homes: list[int] | None = None) -> tuple[Federation, dict[int, FedJob]]:
    fed = Federation(spec, jobs, POLICY, routing)
    if homes is not None and routing is Routing.PER_CLUSTER:
        fed.homes = homes
    fed.run()
    return fed, {j.job_id: j for j in fed.done}


def two(gbps: float = 100.0, a: int = 8, b: int = 8) -> FederationSpec:
    return FederationSpec((ClusterSpec("a", a, "x"), ClusterSpec("b", b, "y")),
                          links=((("a", "b"), gbps),))


# -- placement -------------------------------------------------------------------------

def test_a_job_is_placed_on_the_cluster_with_room_unless_it_is_bound_to_a_full_home():
    # a premium job fills cluster a; a standard job of the same size comes later.
    jobs = [job(0, 0, 5000, 8, Tier.PREMIUM), job(1, 10, 100, 8, Tier.STANDARD)]
    for routing in (Routing.FIRST_SIBLING, Routing.GLOBAL):
        fed, done = run(two(), jobs, routing)
        assert done[0].cluster != done[1].cluster, routing
        assert done[1].first_start - done[1].submit <= C.DAEMON_PERIOD_S, routing
    # per-cluster, both homed on a: the second waits for the first to finish
    fed, done = run(two(), jobs, Routing.PER_CLUSTER, homes=[0, 0])
    assert done[0].cluster == done[1].cluster == 0
    assert done[1].first_start >= done[0].end
    assert fed.summary()["utilization_by_cluster"]["b"] == 0.0


def test_global_sends_a_job_to_gpus_free_now_rather_than_to_gpus_a_victim_still_holds():
    # basic X fills a, basic Y holds 6 of b; premium P (4) preempts X on a at t=100:
    # a then shows 4 free GPUs that X holds until its checkpoint is done. Premium Q
    # (2) comes at t=101: b's 2 free GPUs are ready, a's are not.
    jobs = [job(0, 0, 10_000, 8, Tier.BASIC), job(1, 0, 10_000, 6, Tier.BASIC),
            job(2, 100, 3000, 4, Tier.PREMIUM), job(3, 101, 1000, 2, Tier.PREMIUM)]
    fed, done = run(two(), jobs, Routing.GLOBAL)
    x, p, q = done[0], done[2], done[3]
    assert x.preemptions == 1 and p.cluster == x.cluster == 0
    assert q.cluster == 1
    assert q.overhead_gpu_s == 0 and q.end - q.first_start == pytest.approx(1000)


def test_a_job_that_just_started_is_no_victim_in_any_policy_as_in_the_daemon():
    # basic jobs fill both clusters at t=0; a standard job at t=20 may preempt one only
    # once it has run PlannerSettings.min_run_s (the planner's hysteresis; the
    # simulator plans on events only, so it may start later still)
    jobs = [job(0, 0, 10_000, 8, Tier.BASIC), job(1, 0, 10_000, 8, Tier.BASIC),
            job(2, 20, 1000, 8, Tier.STANDARD)]
    for routing in Routing:
        fed, done = run(two(), jobs, routing, homes=[0, 1, 0])
        assert done[2].first_start >= PlannerSettings().min_run_s, routing


def test_per_cluster_homes_are_drawn_in_proportion_to_the_clusters_gpus():
    spec = two(a=8, b=24)
    jobs = [job(k, k, 10, 1, Tier.BASIC) for k in range(10_000)]
    homes = home_clusters(jobs, spec, seed=3)
    share = homes.count(0) / len(homes)
    assert abs(share - 8 / 32) < 0.02
    assert homes == home_clusters(jobs, spec, seed=3)          # seeded


def test_first_sibling_never_moves_a_requeued_job_and_global_moves_it_to_free_room():
    # S (standard) runs on a, B (basic, short) on b (9 GPUs each: a move leaves one free);
    # premium P preempts S on a at t=100; B ends at ~500 and frees b.
    jobs = [job(0, 0, 5000, 8, Tier.STANDARD), job(1, 0, 500, 8, Tier.BASIC),
            job(2, 100, 5000, 8, Tier.PREMIUM)]
    fed, done = run(two(a=8 + MIGRATE_KEEP, b=8 + MIGRATE_KEEP), jobs, Routing.FIRST_SIBLING)
    s, b, p = done[0], done[1], done[2]
    assert s.preemptions == 1 and p.cluster == s.cluster
    assert s.migrations == 0 and fed.migrations == 0
    assert s.end > p.end + 4000                   # it waited for P on its own cluster
    stayed = s.end
    fed, done = run(two(a=8 + MIGRATE_KEEP, b=8 + MIGRATE_KEEP), jobs, Routing.GLOBAL)
    s, b, p = done[0], done[1], done[2]
    assert s.migrations == 1 and s.cluster == b.cluster != p.cluster
    assert b.end <= s.end < b.end + 5000 < stayed   # it resumed on b when B ended
    summary = fed.summary()
    assert summary["migrations"] == 1
    assert summary["bytes_moved"] == C.STATE_BYTES


# -- migration cost ---------------------------------------------------------------------

def moved(gbps: float, keep: int = MIGRATE_KEEP) -> tuple[Federation, dict[int, FedJob]]:
    """a:10 b:4+keep. S (standard, 4 GPUs) and B (basic, 4) start on a (the
    most free); premium P (10) needs all of a at t=1000: both are preempted,
    and b has room for one."""
    jobs = [job(0, 0, 10_000, 4, Tier.STANDARD), job(1, 0, 10_000, 4, Tier.BASIC),
            job(2, 1000, 3000, 10, Tier.PREMIUM)]
    return run(two(gbps, a=10, b=4 + keep), jobs, Routing.GLOBAL)


def test_a_preempted_job_moves_to_a_cluster_with_room_when_the_copy_pays():
    fed, done = moved(100.0)
    s, b, p = done[0], done[1], done[2]
    assert p.cluster == 0 and p.first_start - p.submit < 30
    assert s.migrations == 1 and s.cluster == 1        # standard goes first
    assert b.migrations == 0 and b.cluster == 0 and b.first_start < p.end <= b.end
    assert fed.summary()["bytes_moved"] == C.STATE_BYTES


def test_a_move_never_takes_the_last_free_gpus_of_its_destination():
    # b has exactly S's 4 GPUs free: moving S there would leave none for an arrival
    fed, done = moved(100.0, keep=0)
    s, p = done[0], done[2]
    assert MIGRATE_KEEP >= 1
    assert s.migrations == 0 and fed.migrations == 0 and fed.bytes_moved == 0
    assert s.cluster == 0 and s.first_start < p.submit < p.end <= s.end


def test_a_migration_waits_for_the_copy_over_the_link():
    fast, slow = moved(100.0)[1][0], moved(1.0)[1][0]
    copy = lambda gbps: C.STATE_BYTES * 8 / (gbps * 1e9)
    assert slow.migrations == fast.migrations == 1
    assert slow.end - fast.end == pytest.approx(copy(1.0) - copy(100.0), abs=1e-6)
    assert slow.overhead_gpu_s - fast.overhead_gpu_s == pytest.approx(
        4 * (copy(1.0) - copy(100.0)), abs=1e-6)


def test_no_migration_when_the_copy_costs_more_than_the_rule_allows():
    # S has done ~1000 s of work; a copy over 0.01 Gbit/s takes 1600 s > 10% of it.
    fed, done = moved(0.01)
    s, p = done[0], done[2]
    assert s.migrations == 0 and fed.migrations == 0 and fed.bytes_moved == 0
    assert s.cluster == 0 and s.end > p.end


def test_every_policy_finishes_every_job_on_one_run():
    spec = uniform(3, 48, regions=2)
    jobs = [TraceJob(k, 30.0 * k, 200.0 + 37 * (k % 7), (1, 2, 4, 8)[k % 4], f"acct{k % 3}",
                     (Tier.PREMIUM, Tier.STANDARD, Tier.BASIC)[k % 3]) for k in range(60)]
    jobs = [TraceJob(j.job_id, j.submit_s, j.duration_s, j.world_size, j.account, j.tier,
                     1, j.world_size) for j in jobs]
    out = simulate_federation(spec, jobs, POLICY, tuple(Routing))
    for name, s in out.items():
        assert s["jobs"] == 60, name
        assert set(s["utilization_by_cluster"]) == {"c0", "c1", "c2"}
        assert sum(s["jobs_by_cluster"].values()) == 60


def test_a_job_larger_than_every_cluster_is_refused_by_name():
    with pytest.raises(ValueError, match="job 0 needs at least 16 GPUs; the largest cluster has 8"):
        simulate_federation(two(), [job(0, 0, 10, 16, Tier.BASIC)], POLICY)


# -- the spec -------------------------------------------------------------------------------

def test_a_cli_spec_gives_clusters_regions_and_link_bandwidths():
    spec = parse_federation("east:16000@us,west:12000@us,tokyo:8000@ap;intra=40;inter=5;"
                            "east-tokyo=25")
    assert spec.total_gpus == 36000
    assert [c.region for c in spec.clusters] == ["us", "us", "ap"]
    assert spec.gbps(0, 1) == 40 and spec.gbps(1, 2) == 5 and spec.gbps(2, 0) == 25
    assert spec.transfer_s(0, 2, 2e9) == pytest.approx(2e9 * 8 / 25e9)
    assert spec.transfer_s(1, 1, 2e9) == 0


@pytest.mark.parametrize("text, message", [
    ("", "--federation: empty"),
    ("east:many,west:8", "clusters.east.gpus: not a whole number: 'many'"),
    ("east:0,west:8", r"clusters.east.gpus: must be a whole number in \[1, 100000\], got 0"),
    ("east:200000,west:8", "clusters.east.gpus: must be a whole number"),
    ("east:8", "clusters: a federation has 2 to 1000 clusters, got 1"),
    ("east:8,east:8", "clusters.east: named twice"),
    ("east:8,1west:8", "clusters.1west: name: must be a letter"),
    ("east,west:8", "cluster 'east': expected NAME:GPUS"),
    ("east:8@u s,west:8", "clusters.east.region: must be a letter"),
    ("east:8,west:8;inter=-1", r"inter_region_gbps: must be a number of Gbit/s in \[0.001"),
    ("east:8,west:8;intra=nan", "intra_region_gbps: must be a number"),
    ("east:8,west:8;intra=fast", "intra: not a number: 'fast'"),
    ("east:8,west:8;east-mars=5", "links.east-mars: unknown cluster 'mars'"),
    ("east:8,west:8;east-east=5", "links.east-east: a link joins two different clusters"),
    ("east:8,west:8;east-west=0", "links.east-west.gbps: must be a number"),
    ("east:8,west:8;speed=5", "unknown option 'speed'"),
    ("east:8,west:8;gpus_per_node=0", r"gpus_per_node: must be a whole number in \[1, 128\]"),
    ("east:8,west:8;inter", "option 'inter': expected KEY=VALUE"),
])
def test_a_bad_cli_spec_is_refused_naming_the_field(text, message):
    with pytest.raises(FedSpecError, match=message):
        parse_federation(text)


def test_a_toml_spec_reads_clusters_and_links(tmp_path):
    path = tmp_path / "fed.toml"
    path.write_text('inter_region_gbps = 2.5\n[clusters.east]\ngpus = 64\nregion = "us"\n'
                    '[clusters.west]\ngpus = 32\nregion = "eu"\n'
                    '[[links]]\na = "east"\nb = "west"\ngbps = 7.0\n')
    spec = load_federation(path)
    assert [(c.name, c.gpus, c.region) for c in spec.clusters] == [("east", 64, "us"),
                                                                    ("west", 32, "eu")]
    assert spec.gbps(0, 1) == 7.0 and spec.inter_region_gbps == 2.5


@pytest.mark.parametrize("text, message", [
    ("[clusters.east]\ngpus = 8\n[clusters.west]\ngpus = 8\ncolour = 1\n",
     "clusters.west: unknown key 'colour'"),
    ("[clusters.east]\ngpus = 8\n[clusters.west]\nregion = 'x'\n", "clusters.west.gpus: missing"),
    ("[clusters.east]\ngpus = 8.5\n[clusters.west]\ngpus = 8\n", "clusters.east.gpus: must be a whole"),
    ("[clusters.east]\ngpus = true\n[clusters.west]\ngpus = 8\n", "clusters.east.gpus: must be a whole"),
    ("bandwidth = 3\n[clusters.east]\ngpus = 8\n", "unknown key 'bandwidth'"),
    ("[clusters.east]\ngpus = 8\n[clusters.west]\ngpus = 8\n[[links]]\na = 'east'\nb = 'west'\n",
     r"links\[0\]: must have exactly a, b and gbps"),
    ("gpus_per_node = 8\n", "clusters: missing"),
    ("[clusters\n", "not TOML"),
])
def test_a_bad_toml_spec_is_refused_naming_the_file_and_the_field(tmp_path, text, message):
    path = tmp_path / "fed.toml"
    path.write_text(text)
    with pytest.raises(FedSpecError, match=message) as err:
        load_federation(path)
    assert str(err.value).startswith(str(path))


def test_a_service_that_outlives_every_job_keeps_utilization_within_100_percent():
    service = TraceJob(0, 0, 10_000, 8, "default", Tier.PREMIUM, 8, 8, service=True)
    for routing in (Routing.PER_CLUSTER, Routing.FIRST_SIBLING, Routing.GLOBAL):
        fed, _ = run(two(), [service, job(1, 0, 100, 8, Tier.BASIC)], routing, homes=[0, 1])
        s = fed.summary()
        assert s["jobs"] == 1 and s["services"] == 1
        by = s["utilization_by_cluster"]
        assert max(by.values()) <= 1.0 and max(by.values()) > 0.99, routing
        assert s["utilization"] == pytest.approx(sum(by.values()) / 2)
