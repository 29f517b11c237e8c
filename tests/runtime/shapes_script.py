"""Training shapes beyond one optimizer step per pass
(tests/runtime/test_training_shapes_are_bitwise_equal_on_any_number_of_devices.py):
``--shape lbfgs`` steps LBFGS through ``step.optimize`` (a closure over all
logical ranks), ``--shape accumulate`` accumulates 3 micro-batches per
logical rank and step.

Prints ``step <n> loss <x>`` and ``final step=<n> params_sha256=<hex>``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from slurm_singularity import runtime


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=["lbfgs", "accumulate"], required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--step-sleep", type=float, default=0.0)
    args = p.parse_args(argv)
    job = runtime.init()
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(16, 1))
    gen = torch.Generator().manual_seed(8)
    data = torch.utils.data.TensorDataset(torch.randn(512, 6, generator=gen),
                                          torch.randn(512, 1, generator=gen))
    if args.shape == "lbfgs":
        opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4, history_size=5)
        trainer = job.trainer(model, opt, data, batch_size=8)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        trainer = job.trainer(model, opt, data, batch_size=4, accumulate=3)
    for step in trainer.steps(args.steps):
        if args.shape == "lbfgs":
            loss = step.optimize(lambda batch: F.mse_loss(model(batch[0]), batch[1]))
        else:
            for x, y in step.batches():
                (F.mse_loss(model(x), y) / 3).backward()
            loss = float("nan")
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if job.is_main:
            print(f"step {step.index + 1} loss {loss:.6f}", flush=True)
    if job.is_main:
        print(f"final step={trainer.step} params_sha256={trainer.params_sha256()}", flush=True)
    job.close()


if __name__ == "__main__":
    main()
