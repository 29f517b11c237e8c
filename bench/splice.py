"""Replica splicing vs plain gradient accumulation, same run, alternating.

The example language model (examples/train_lm.py, its default size) with
W=8 logical ranks spliced onto one device through the runtime (per-rank data
shard, RNG stream swap, deterministic reduction, preemption agreement) vs
the same 8 micro-batches per step through plain PyTorch gradient
accumulation in one process (backward 8 times, divide by 8, step). Both
read their micro-batches from the same kind of shards, so only the
runtime's per-step overhead differs. Goal: ratio of median step times
<= 1.03. Last line: the JSON result.

``--workers N`` (N >= 1): both sides are fed by N DataLoader worker
processes: the trainer gets a ``DataLoader(..., num_workers=N)`` (one
worker pool per device serving its logical ranks, each micro-batch seeded
from its logical rank and position), the baseline a plain DataLoader with N
workers over the same shards' micro-batches in the same order.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slurm_singularity.runtime.api import JobShape
from slurm_singularity.runtime.data import RankShard
from slurm_singularity.runtime.job import Job

from _example import load_example  # noqa: E402 - bench/ is the script's dir

W = 8
STEPS_PER_ROUND = 4
ROUNDS = 31
GOAL = 1.03


def tiny_overhead_us(workers: int = 0) -> float:
    """Per-step cost of the runtime alone: the same comparison on a model so
    small that forward and backward cost almost nothing (median of rounds,
    in microseconds; can be negative within noise); with ``workers``, both
    sides read through that many DataLoader workers."""
    data = torch.utils.data.TensorDataset(torch.randn(4096, 8), torch.randn(4096, 1))

    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.1),
                                torch.nn.Linear(8, 1))
        return m, torch.optim.AdamW(m.parameters())

    job = Job(shape=JobShape(W, 1), device=torch.device("cpu"), deterministic=True,
              ckpt_dir=None)
    model, opt = make()
    feed = data if not workers else torch.utils.data.DataLoader(
        data, batch_size=4, shuffle=True, num_workers=workers)
    steps = job.trainer(model, opt, feed, batch_size=4).steps(10**9)
    base_model, base_opt = make()
    shards = _micro_batches(data, [RankShard(data, r, W, 4) for r in range(W)], workers)

    def spliced(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            for x, y in next(steps).batches():
                F.mse_loss(model(x), y).backward()
        return (time.perf_counter() - t0) / n

    def plain(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            base_opt.zero_grad(set_to_none=True)
            for shard in shards:
                x, y = shard.next_batch()
                F.mse_loss(base_model(x), y).backward()
            for p in base_model.parameters():
                p.grad.div_(W)
            base_opt.step()
        return (time.perf_counter() - t0) / n

    spliced(10), plain(10)
    a, b = [], []
    for _ in range(15):
        a.append(spliced(20))
        b.append(plain(20))
    steps.close()  # end the run here, so its stop line comes before the JSON
    return (statistics.median(a) - statistics.median(b)) * 1e6


class _ShardBatches(torch.utils.data.Sampler):
    """The baseline's micro-batch indices: the W shards in turn, for ever."""

    def __init__(self, shards: list[RankShard]) -> None:
        self.shards = shards

    def __iter__(self):
        while True:
            for shard in self.shards:
                yield shard.next_indices()[1]


class _LoaderFeed:
    """The baseline's micro-batches read by a DataLoader's workers."""

    def __init__(self, data, shards: list[RankShard], workers: int) -> None:
        self.it = iter(torch.utils.data.DataLoader(data, batch_sampler=_ShardBatches(shards),
                                                   num_workers=workers))

    def next_batch(self):
        return next(self.it)


def _micro_batches(data, shards: list[RankShard], workers: int) -> list:
    """What the baseline reads from, one entry per logical rank: the shards
    themselves, or a DataLoader with ``workers`` processes over the same
    micro-batches (read in the same rank order)."""
    if not workers:
        return shards
    return [_LoaderFeed(data, shards, workers)] * len(shards)


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--workers", type=int, default=0,
                     help="DataLoader worker processes feeding both sides (0: none)")
    workers = cli.parse_args().workers
    torch.set_num_threads(1)
    lm = load_example()
    args = lm.parse([])
    data = lm.CharWindows(lm.load_text(args.corpus_bytes), args.block)
    cpu = torch.device("cpu")

    job = Job(shape=JobShape(W, 1), device=cpu, deterministic=True, ckpt_dir=None)
    model, opt, sched = lm.build(args, cpu)
    feed = data if not workers else torch.utils.data.DataLoader(
        data, batch_size=args.batch_size, shuffle=True, num_workers=workers)
    trainer = job.trainer(model, opt, feed, batch_size=args.batch_size, scheduler=sched,
                          seed=args.seed)
    spliced_steps = trainer.steps(10**9)

    base_model, base_opt, base_sched = lm.build(args, cpu)
    shards = _micro_batches(data, [RankShard(data, r, W, args.batch_size, seed=args.seed)
                                   for r in range(W)], workers)

    def spliced_round() -> float:
        # each next() finishes the previous step (reduce, optimizer, agree)
        # and starts the next: as many finishes as bodies per round
        t0 = time.perf_counter()
        for _ in range(STEPS_PER_ROUND):
            step = next(spliced_steps)
            for x, y in step.batches():
                F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        return (time.perf_counter() - t0) / STEPS_PER_ROUND

    def baseline_round() -> float:
        t0 = time.perf_counter()
        for _ in range(STEPS_PER_ROUND):
            base_opt.zero_grad(set_to_none=True)
            for shard in shards:
                x, y = shard.next_batch()
                F.cross_entropy(base_model(x).flatten(0, 1), y.flatten()).backward()
            for p in base_model.parameters():
                p.grad.div_(W)
            base_opt.step()
            base_sched.step()
        return (time.perf_counter() - t0) / STEPS_PER_ROUND

    first = next(spliced_steps)
    for x, y in first.batches():
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    baseline_round()
    t_splice, t_base = [], []
    for i in range(ROUNDS):
        order = (spliced_round, baseline_round) if i % 2 == 0 else (baseline_round, spliced_round)
        for fn in order:
            (t_splice if fn is spliced_round else t_base).append(fn())
    value, base = statistics.median(t_splice), statistics.median(t_base)
    spliced_steps.close()  # end the run here, so its stop line comes before the JSON
    overhead = tiny_overhead_us(workers)
    ratio = value / base
    print(f"W={W} spliced on one device: {value * 1e3:.2f} ms/step; plain gradient "
          f"accumulation of {W} micro-batches: {base * 1e3:.2f} ms/step "
          f"(median of {ROUNDS} rounds x {STEPS_PER_ROUND} steps)", file=sys.stderr)
    print(json.dumps({"bench": "splice", "value": round(value, 5), "baseline": round(base, 5),
                      "ratio": round(ratio, 3), "unit": "s/step", "goal": GOAL,
                      "ok": ratio <= GOAL, "world_size": W, "devices": 1,
                      "data_workers": workers,
                      "pair_ratio_median": round(statistics.median(
                          a / b for a, b in zip(t_splice, t_base)), 3),
                      "tiny_model_overhead_us_per_step": round(overhead, 1),
                      "micro_batch": args.batch_size, "block": args.block,
                      "baseline_kind": "plain gradient accumulation, same micro-batches"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
