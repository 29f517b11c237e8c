"""A training script with what DDP users rely on (tests/runtime/test_ddp_parity.py):
a head that never gets a gradient, a head that only logical rank 0 uses, a
collate that draws from Python's ``random`` and numpy's global generator,
dropout, AdamW with weight decay. ``build`` and ``collate`` are imported by
the test's plain-PyTorch reference.

Prints ``final step=<n> params_sha256=<hex> unused_sha256=<hex>``.
"""

from __future__ import annotations

import argparse
import hashlib
import random

import numpy
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import default_collate

W_DECAY = 0.1


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.2))
        self.head = nn.Linear(16, 2)
        self.rank0_head = nn.Linear(16, 2)   # used by logical rank 0 only
        self.unused = nn.Linear(16, 2)       # never used: no gradient on any rank

    def forward(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        h = self.trunk(x)
        out = self.head(h)
        return out + self.rank0_head(h) if rank == 0 else out


def build(seed: int):
    torch.manual_seed(seed)
    model = Net()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=W_DECAY)


def dataset(n: int = 64) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(99)
    return torch.utils.data.TensorDataset(torch.randn(n, 4, generator=gen),
                                          torch.randint(0, 2, (n,), generator=gen))


def collate(samples):
    """Random augmentation as many collates do it: the global generators."""
    x, y = default_collate(samples)
    return x * (1.0 + 0.1 * random.random()) + 0.1 * float(numpy.random.rand()), y


def sha256(tensors) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(argv=None) -> None:
    from slurm_singularity import runtime
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args(argv)
    job = runtime.init()
    model, opt = build(args.seed)
    trainer = job.trainer(model, opt, dataset(), batch_size=args.batch_size, seed=args.seed,
                          collate=collate)
    for step in trainer.steps(args.steps):
        for x, y in step.batches():
            F.cross_entropy(model(x, step.rank), y).backward()
    if job.is_main:
        print(f"final step={trainer.step} params_sha256={trainer.params_sha256()} "
              f"unused_sha256={sha256(model.unused.parameters())}", flush=True)
    job.close()


if __name__ == "__main__":
    main()
