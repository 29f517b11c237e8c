"""A training script fed by a DataLoader-style pipeline, for the data and
metrics tests: ``--data loader`` (a torch DataLoader over a map-style
dataset, ``--workers`` processes, a collate that augments with torch's and
Python's ``random``) or ``--data iterable`` (an IterableDataset that
shuffles each epoch with its own generator; with ``--workers`` above 0 in a
DataLoader with that many workers and the augmenting collate).

Every device prints, per turn, ``batch <step> <logical rank> <sha256 of the
micro-batch>`` and ``rankloss <step> <logical rank> <loss as float.hex>``;
device 0 prints ``step <n> loss <mean> sum <sum> max <max>`` (reduced over
all logical ranks, float.hex) and at the end ``final step=<n> params_sha256=<hex>``.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from slurm_singularity import runtime


class Samples(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        gen = torch.Generator().manual_seed(5)
        self.x = torch.randn(n, 8, generator=gen)
        self.y = (self.x.sum(dim=1) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def augmenting_collate(items):
    x, y = torch.utils.data.default_collate(items)
    jitter = torch.rand(x.shape) * 0.1 + random.random() * 0.01
    return x + jitter, y


class Stream(torch.utils.data.IterableDataset):
    """Samples in an order shuffled per epoch by a generator of its own."""

    def __init__(self, n: int) -> None:
        self.data = Samples(n)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(1000 + self.epoch)
        for i in torch.randperm(len(self.data), generator=gen).tolist():
            yield self.data[i]


def say(line: str) -> None:
    """One write per line: the devices share the launcher's stdout."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def digest(batch) -> str:
    h = hashlib.sha256()
    for t in batch:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", choices=["loader", "iterable", "dataset"], default="loader")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--samples", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--step-sleep", type=float, default=0.0)
    args = p.parse_args()
    job = runtime.init()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if args.data == "loader":
        data = torch.utils.data.DataLoader(
            Samples(args.samples), batch_size=args.batch_size, shuffle=True,
            num_workers=args.workers, collate_fn=augmenting_collate, prefetch_factor=2
            if args.workers else None, pin_memory=True)
    elif args.data == "iterable" and args.workers:
        data = torch.utils.data.DataLoader(
            Stream(args.samples), batch_size=args.batch_size, num_workers=args.workers,
            collate_fn=augmenting_collate)
    elif args.data == "iterable":
        data = Stream(args.samples)
    else:
        data = Samples(args.samples)
    trainer = job.trainer(model, opt, data, batch_size=args.batch_size, seed=3)
    for step in trainer.steps(args.steps):
        for x, y in step.batches():
            say(f"batch {step.index + 1} {step.rank} {digest((x, y))}")
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            step.record("loss", loss)
            say(f"rankloss {step.index + 1} {step.rank} {loss.item().hex()}")
        mean, total, top = (step.reduce("loss", op) for op in ("mean", "sum", "max"))
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if job.is_main:
            say(f"step {step.index + 1} loss {mean.hex()} sum {total.hex()} max {top.hex()}")
    if job.is_main:
        say(f"final step={trainer.step} params_sha256={trainer.params_sha256()}")
    job.close()


if __name__ == "__main__":
    main()
