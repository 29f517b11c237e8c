"""Ends its run early at step ``--at`` (tests/runtime/test_stopping_early_keeps_the_step.py):
``--how stop`` calls ``trainer.stop()`` on device 0 only, ``--how break``
breaks out of ``trainer.steps()`` after the step's pass, ``--how
break-inner`` breaks out of ``step.batches()`` and then out of the loop.

Prints ``final step=<n> params_sha256=<hex>``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from slurm_singularity import runtime


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--at", type=int, default=None, help="step index to stop in")
    p.add_argument("--how", choices=["stop", "break", "break-inner"], default="stop")
    args = p.parse_args(argv)
    job = runtime.init()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1),
                                torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(5)
    data = torch.utils.data.TensorDataset(torch.randn(256, 4, generator=gen),
                                          torch.randn(256, 1, generator=gen))
    trainer = job.trainer(model, opt, data, batch_size=4)
    for step in trainer.steps(args.steps):
        stopping = step.index == args.at
        for turn, (x, y) in enumerate(step.batches()):
            F.mse_loss(model(x), y).backward()
            if stopping and args.how == "break-inner" and turn == 0:
                break
        if stopping and args.how == "stop" and job.is_main:
            trainer.stop()
        if stopping and args.how.startswith("break"):
            break
    if job.is_main:
        print(f"final step={trainer.step} params_sha256={trainer.params_sha256()}", flush=True)
    job.close()


if __name__ == "__main__":
    main()
