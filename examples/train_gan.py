"""A small GAN trained with the slurm-singularity runtime: two models, two
optimizers stepped in alternating passes, user state kept across requeues.

Shows what a GAN script looks like under the runtime:

* the generator and the discriminator are one trainer's models (a dict),
  with an optimizer each, by name;
* each step runs a discriminator pass (``step.batches("d")``: real
  micro-batches, fakes from noise) and then a generator pass through the
  updated discriminator (``step.ranks("g")``: noise only); each pass ends by
  reducing its optimizer's gradients and stepping it;
* an EMA of the generator (``AveragedModel``) and a dict of counters and a
  run id are registered with the trainer, so they survive preemption.

It prints ``step <n>`` after every step and at the end
``final step=<n> params_sha256=<hex> user_sha256=<hex> run_id=<id>``,
the same on any number of devices and across preemptions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import uuid

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from slurm_singularity import runtime

NOISE = 8


def ring(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """Points on a noisy ring: the distribution the generator learns."""
    gen = torch.Generator().manual_seed(seed + 777)
    angle = torch.rand(n, generator=gen) * 6.2832
    radius = 1.0 + 0.05 * torch.randn(n, generator=gen)
    return torch.utils.data.TensorDataset(torch.stack([radius * angle.cos(),
                                                       radius * angle.sin()], dim=1))


def build(seed: int, device: torch.device):
    torch.manual_seed(seed)
    gen = nn.Sequential(nn.Linear(NOISE, 32), nn.ReLU(), nn.Linear(32, 2)).to(device)
    disc = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Dropout(0.1),
                         nn.Linear(32, 1)).to(device)
    opts = {"d": torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.999)),
            "g": torch.optim.Adam(gen.parameters(), lr=2e-3, betas=(0.5, 0.999))}
    return gen, disc, opts


def user_sha256(ema: AveragedModel, stats: dict) -> str:
    counters = {k: v for k, v in stats.items() if k != "run_id"}   # the id is random
    digest = hashlib.sha256(json.dumps(counters, sort_keys=True).encode())
    for value in ema.state_dict().values():
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch per logical rank")
    p.add_argument("--step-sleep", type=float, default=0.0,
                   help="seconds to sleep per step (tests: time to send a signal)")
    args = p.parse_args(argv)
    job = runtime.init()
    gen, disc, opts = build(args.seed, job.device)
    ema = AveragedModel(gen, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    stats = {"run_id": uuid.uuid4().hex[:12], "d_steps": 0, "g_steps": 0}
    trainer = job.trainer({"g": gen, "d": disc}, opts, ring(4096, args.seed),
                          batch_size=args.batch_size, seed=args.seed,
                          state={"ema": ema, "stats": stats})
    if job.is_main:
        print(f"run_id {stats['run_id']}", flush=True)
    for step in trainer.steps(args.steps):
        for (real,) in step.batches("d"):
            fake = gen(torch.randn(real.shape[0], NOISE, device=job.device)).detach()
            real_logit, fake_logit = disc(real), disc(fake)
            loss_d = (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
                      + F.binary_cross_entropy_with_logits(fake_logit,
                                                           torch.zeros_like(fake_logit)))
            loss_d.backward()
        stats["d_steps"] += 1
        for _rank in step.ranks("g"):
            logit = disc(gen(torch.randn(args.batch_size, NOISE, device=job.device)))
            F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit)).backward()
        stats["g_steps"] += 1
        ema.update_parameters(gen)
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if job.is_main:
            print(f"step {step.index + 1}", flush=True)
    if job.is_main:
        print(f"final step={trainer.step} params_sha256={trainer.params_sha256()} "
              f"user_sha256={user_sha256(ema, stats)} run_id={stats['run_id']}", flush=True)
    job.close()


if __name__ == "__main__":
    main()
