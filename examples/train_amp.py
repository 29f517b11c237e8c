"""Mixed precision (fp16 autocast) with ``torch.amp.GradScaler`` under the
slurm-singularity runtime; on CPU the fp16 arithmetic is emulated.

The script only scales its loss (``scaler.scale(loss).backward()``); the
trainer unscales the reduced gradients, clips them, steps the optimizer
through the scaler (skipping a step whose gradients hold an inf or NaN) and
updates the scale once per step. The scaler's state is checkpointed. The
initial scale is set so high that the first steps overflow, so the skip
and back-off paths run; every device sees the same reduced gradients, so
all skip the same steps.

It prints ``step <n> scale <s>`` after every step and at the end
``final step=<n> params_sha256=<hex> scale=<s>``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from slurm_singularity import runtime


def synthetic(n: int, dim: int, classes: int, seed: int) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(seed + 4242)
    x = torch.randn(n, dim, generator=gen)
    y = (x @ torch.randn(dim, classes, generator=gen)).argmax(dim=1)
    return torch.utils.data.TensorDataset(x, y)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--init-scale", type=float, default=2.0**24)
    p.add_argument("--step-sleep", type=float, default=0.0)
    args = p.parse_args(argv)
    job = runtime.init()
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Dropout(0.1),
                          nn.Linear(64, 4)).to(job.device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler(job.device.type, init_scale=args.init_scale,
                                  growth_interval=3)
    trainer = job.trainer(model, opt, synthetic(2048, 16, 4, args.seed),
                          batch_size=args.batch_size, seed=args.seed, scaler=scaler,
                          grad_clip=1.0)
    for step in trainer.steps(args.steps):
        for x, y in step.batches():
            with torch.autocast(job.device.type, dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if job.is_main:
            print(f"step {step.index + 1} scale {scaler.get_scale():g}", flush=True)
    if job.is_main:
        print(f"final step={trainer.step} params_sha256={trainer.params_sha256()} "
              f"scale={scaler.get_scale():g}", flush=True)
    job.close()


if __name__ == "__main__":
    main()
