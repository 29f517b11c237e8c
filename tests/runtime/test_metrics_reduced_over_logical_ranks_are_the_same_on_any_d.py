"""Issue 17, item 4: a metric reduced over the W logical ranks (mean, sum,
max) is the same, bit for bit, on 1, 2 and 4 devices, and is the fold of
the logical ranks' own values in rank order."""

from __future__ import annotations

from pathlib import Path

import runtime_harness as harness

PIPELINE = str(Path(__file__).with_name("pipeline_worker.py"))
W = 4
ARGS = ("--data", "dataset", "--samples", "64", "--batch-size", "4", "--steps", "6")


def reduced(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("step ")]


def per_rank(out: str) -> dict[int, list[float]]:
    """step -> the logical ranks' losses in rank order."""
    losses: dict[int, dict[int, float]] = {}
    for line in out.splitlines():
        if line.startswith("rankloss "):
            _, step, rank, value = line.split()
            losses.setdefault(int(step), {})[int(rank)] = float.fromhex(value)
    return {s: [by_rank[r] for r in range(W)] for s, by_rank in losses.items()}


def test_the_reduced_loss_is_bitwise_the_same_on_one_two_and_four_devices(tmp_path):
    outs = []
    for devices in (1, 2, 4):
        done = harness.run(PIPELINE, tmp_path / f"d{devices}", devices, W, *ARGS)
        assert done.returncode == 0, done.stderr[-3000:]
        outs.append(done.stdout)
    lines = [reduced(out) for out in outs]
    assert len(lines[0]) == 6
    assert lines[1] == lines[0] and lines[2] == lines[0]

    ranks = per_rank(outs[2])
    for line in lines[0]:
        _, step, _, mean, _, total, _, top = line.split()
        values = ranks[int(step)]
        fold = 0.0
        for v in values:
            fold += v
        assert float.fromhex(total) == fold
        assert float.fromhex(mean) == fold / W
        assert float.fromhex(top) == max(values)
