"""A small MLP classifier with BatchNorm and dropout trained with the
slurm-singularity runtime on synthetic data, to show that every logical rank
keeps its own RNG stream (dropout masks) and, with ``--buffers per_rank``,
its own BatchNorm running statistics, whatever the number of devices.

It prints ``final step=<n> params_sha256=<hex> buffers_sha256=<hex>``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from slurm_singularity import runtime


def synthetic(n: int, dim: int, classes: int, seed: int) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(seed + 12345)
    x = torch.randn(n, dim, generator=gen)
    w = torch.randn(dim, classes, generator=gen)
    y = (x @ w).argmax(dim=1)
    return torch.utils.data.TensorDataset(x, y)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--buffers", choices=[b.value for b in runtime.BufferPolicy],
                   default="per_rank")
    args = p.parse_args(argv)
    job = runtime.init()
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(32, 4)).to(job.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = job.trainer(model, opt, synthetic(2048, 16, 4, args.seed),
                          batch_size=args.batch_size, seed=args.seed,
                          ckpt_every=args.ckpt_every,
                          buffers=runtime.BufferPolicy(args.buffers))
    for step in trainer.steps(args.steps):
        for x, y in step.batches():
            F.cross_entropy(model(x), y).backward()
    buffers = trainer.buffers_sha256()
    if job.is_main:
        print(f"final step={trainer.step} params_sha256={trainer.params_sha256()} "
              f"buffers_sha256={buffers}", flush=True)
    job.close()


if __name__ == "__main__":
    main()
