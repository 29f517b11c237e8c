"""The sub-linear job model (``sched/goodput.py``): its curve's shape, and that
it changes nothing for schedulers that run every job at its W."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from slurm_singularity.sched import goodput
from slurm_singularity.sched.sim import constants as C
from slurm_singularity.sched.sim.engine import Engine
from slurm_singularity.sched.sim.policies import reference_policy
from slurm_singularity.sched.sim.run import SimSpec, load_jobs, simulate
from slurm_singularity.sched.sim.schedulers import make_scheduler

POLICY = reference_policy()
WORLDS = (1, 2, 4, 8, 16, 32, 64, 128)


def sizes(w: int) -> list[int]:
    """Legal sizes: divisors of ``w`` within the policy's default splice factor (16)."""
    return [d for d in range(1, w + 1) if w % d == 0 and w // d <= 16]


def fractions(w: int) -> tuple[float, ...]:
    lo, hi = goodput.sync_range(w)
    return (lo, (lo + hi) / 2, hi, goodput.SYNC_FRACTION_MAX if w > 1 else 0.0)


@pytest.mark.parametrize("w", WORLDS)
def test_a_job_runs_at_its_full_rate_on_its_world_size_whatever_its_sync_fraction(w):
    for f in fractions(w):
        assert goodput.rate(w, w, f) == pytest.approx(1.0)


@pytest.mark.parametrize("w", WORLDS)
def test_more_devices_never_slow_a_job_down_but_each_buys_less(w, monkeypatch):
    for f in fractions(w):
        rates = [goodput.rate(w, d, f) for d in sizes(w)]
        assert rates == sorted(rates), (w, f, rates)
        per_gpu = [r / d for r, d in zip(rates, sizes(w))]
        assert per_gpu[-1] == min(per_gpu)       # every shrink makes each GPU buy more
    # Apart from the splice overhead (a few ranks spliced cost a little more
    # per GPU than two), each GPU added buys less than the one before.
    monkeypatch.setattr(goodput, "SPLICE_COST_PER_RANK", 0.0)
    goodput.rate.cache_clear()
    try:
        for f in fractions(w):
            per_gpu = [goodput.rate(w, d, f) / d for d in sizes(w)]
            assert per_gpu == sorted(per_gpu, reverse=True), (w, f, per_gpu)
    finally:
        monkeypatch.undo()
        goodput.rate.cache_clear()


def test_a_multi_node_job_on_one_node_is_faster_than_the_linear_model_says():
    f = goodput.default_sync_fraction(16)
    linear = 8 / 16 / goodput.splice_overhead(2)
    assert goodput.rate(16, 8, f) > 1.2 * linear     # no inter-node all-reduce on one node
    assert goodput.rate(16, 8, 0.0) == pytest.approx(linear)   # f = 0 is the linear model


def test_sync_fractions_are_drawn_per_job_from_the_seed_in_the_documented_ranges():
    for w in (1, 4, 8, 16, 64):
        lo, hi = goodput.sync_range(w)
        drawn = [goodput.draw_sync_fraction(w, j, 0) for j in range(2000)]
        assert all(lo <= f <= hi for f in drawn)
        if w == 1:
            assert set(drawn) == {0.0}
            continue
        assert max(drawn) - min(drawn) > 0.9 * (hi - lo)          # spread over the range
        assert abs(sum(drawn) / len(drawn) - (lo + hi) / 2) < 0.02 * (hi - lo) + 0.005
        assert drawn == [goodput.draw_sync_fraction(w, j, 0) for j in range(2000)]
        assert drawn != [goodput.draw_sync_fraction(w, j, 1) for j in range(2000)]
    assert max(goodput.SYNC_FRACTION_MULTI_NODE) <= goodput.SYNC_FRACTION_MAX


def philly(tmp: Path) -> Path:
    """A contended hand-made trace: jobs of 1 to 16 GPUs on a 16-GPU cluster."""
    path = tmp / "t.csv"
    lines = ["timestamp,duration,num_gpus,gpu_time,cluster"]
    for k in range(24):
        g = (1, 2, 4, 8, 16)[k % 5]
        d = 600 + 397 * (k % 7)
        lines.append(f"2017-10-01 00:{k * 2:02d}:00,{d},{g},{d * g},c{k % 3}")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_with(trace: Path, name: str, scaling: C.Scaling):
    spec = SimSpec(trace, name, 16, POLICY, tier_rule="size:1/4")
    sched = make_scheduler(name, POLICY, 16, 8)
    sched.costs = dataclasses.replace(sched.costs, scaling=scaling)
    engine = Engine(load_jobs(spec, {}), 16, sched, seed=0)
    engine.run()
    return {j.job_id: (j.first_start, j.end) for j in engine.done}


@pytest.mark.parametrize("name", ["slurm", "tiresias", "las-tiers", "singularity:rigid"])
def test_schedulers_that_run_every_job_at_its_world_size_see_the_same_times_under_either_model(
        tmp_path, name):
    trace = philly(tmp_path)
    assert run_with(trace, name, C.Scaling.SUBLINEAR) == run_with(trace, name, C.Scaling.LINEAR)


def test_an_elastic_job_shrunk_below_its_world_size_runs_faster_than_the_linear_model(tmp_path):
    trace = philly(tmp_path)
    sub = run_with(trace, "singularity", C.Scaling.SUBLINEAR)
    lin = run_with(trace, "singularity", C.Scaling.LINEAR)
    assert sub != lin
    # the ablation's name runs the same planner under the linear model
    _, s = simulate(SimSpec(trace, "singularity:linear", 16, POLICY, tier_rule="size:1/4"))
    assert s["constants"]["costs"]["scaling"] == "linear"


def test_a_bad_scaling_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="Costs.scaling"):
        C.Costs(scaling="quadratic")
