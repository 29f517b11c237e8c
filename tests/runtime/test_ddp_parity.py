"""DDP parity (issue 17 item 6): the runtime gives what a plain-PyTorch run
of DDP's semantics gives, bitwise: a parameter no rank gives a gradient
keeps ``grad = None`` (AdamW leaves it alone), Python's ``random`` and
numpy's generator are kept per logical rank and seeded as docs/runtime.md
says, and a dataset smaller than W is padded as DistributedSampler pads it.

The reference below uses only PyTorch, numpy and the standard library:
DistributedSampler for each rank's indices, the documented seed for each
rank's generators, the gradient as the mean over ranks folded in rank order
(None where no rank had one), AdamW."""

from __future__ import annotations

import hashlib
import importlib.util
import random
import re
from pathlib import Path

import numpy
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

import runtime_harness as harness

SCRIPT = str(Path(__file__).with_name("parity_script.py"))
W, SEED, BATCH, STEPS = 4, 3, 4, 6
FINAL = re.compile(r"final step=(\d+) params_sha256=([0-9a-f]{64}) unused_sha256=([0-9a-f]{64})")


def _script():
    spec = importlib.util.spec_from_file_location("parity_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def documented_seed(seed: int, rank: int) -> int:
    """docs/runtime.md, "Per-rank seeds"."""
    return (seed * 1_000_003 + 7_919 * (rank + 1)) % 2**63


def ddp_reference(steps: int) -> tuple[str, str, str]:
    """(params, unused params, unused params at the start) sha256 of a
    plain-PyTorch run with DDP's semantics on W ranks, one after another."""
    s = _script()
    model, opt = s.build(SEED)
    start_unused = s.sha256(model.unused.parameters())
    data = s.dataset()
    samplers = [DistributedSampler(data, num_replicas=W, rank=r, shuffle=True, seed=SEED)
                for r in range(W)]
    per_epoch = len(samplers[0]) // BATCH
    gens = []
    for r in range(W):
        seed = documented_seed(SEED, r)
        torch_gen = torch.Generator()
        torch_gen.manual_seed(seed)
        gens.append([torch_gen.get_state(), random.Random(seed).getstate(),
                     numpy.random.RandomState(seed % 2**32).get_state()])
    for step in range(steps):
        epoch, pos = divmod(step, per_epoch)
        per_rank = []
        for r in range(W):
            torch.set_rng_state(gens[r][0])
            random.setstate(gens[r][1])
            numpy.random.set_state(gens[r][2])
            samplers[r].set_epoch(epoch)
            idx = list(samplers[r])[pos * BATCH:(pos + 1) * BATCH]
            x, y = s.collate([data[i] for i in idx])
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x, r), y).backward()
            per_rank.append([None if p.grad is None else p.grad.clone()
                             for p in model.parameters()])
            gens[r] = [torch.get_rng_state(), random.getstate(), numpy.random.get_state()]
        for i, p in enumerate(model.parameters()):
            total = None
            for grads in per_rank:       # rank order
                if grads[i] is not None:
                    total = grads[i].clone() if total is None else total + grads[i]
            p.grad = None if total is None else total / W
        opt.step()
    return (s.sha256(p for _, p in model.named_parameters()),
            s.sha256(model.unused.parameters()), start_unused)


def test_the_runtime_matches_a_plain_ddp_run_on_every_number_of_devices(tmp_path):
    params, unused, unused_at_start = ddp_reference(STEPS)
    # AdamW's weight decay would have moved the unused head had it got a zero gradient
    assert unused == unused_at_start
    for devices in (1, 2, 4):
        done = harness.run(SCRIPT, tmp_path / f"d{devices}", devices, W, "--steps", str(STEPS))
        assert done.returncode == 0, done.stderr[-3000:]
        step, got_params, got_unused = FINAL.search(done.stdout).groups()
        assert int(step) == STEPS
        assert got_unused == unused_at_start, f"D={devices}: the unused head moved"
        assert got_params == params, f"D={devices}: parameters differ from the DDP reference"


def test_a_dataset_smaller_than_the_world_is_padded_as_distributed_sampler_pads_it():
    from slurm_singularity.runtime.data import RankShard
    data = torch.utils.data.TensorDataset(torch.arange(3.0))
    for world in (8, 5, 4):
        for r in range(world):
            shard = RankShard(data, r, world, 1, seed=7, collate=lambda b: b[0][0].item())
            sampler = DistributedSampler(data, num_replicas=world, rank=r, seed=7)
            want = [data[i][0].item() for i in sampler]
            assert [shard.next_batch() for _ in range(len(want))] == want, (world, r)


def test_a_job_on_a_dataset_smaller_than_the_world_trains_instead_of_crashing(tmp_path):
    from slurm_singularity.runtime.api import JobShape
    from slurm_singularity.runtime.job import Job
    job = Job(shape=JobShape(8, 1), device=torch.device("cpu"), deterministic=True,
              ckpt_dir=None)
    model = torch.nn.Linear(2, 1)
    data = torch.utils.data.TensorDataset(torch.randn(3, 2), torch.randn(3, 1))
    trainer = job.trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data,
                          batch_size=1)
    before = hashlib.sha256(model.weight.detach().numpy().tobytes()).hexdigest()
    for step in trainer.steps(3):
        for x, y in step.batches():
            F.mse_loss(model(x), y).backward()
    assert trainer.step == 3
    assert hashlib.sha256(model.weight.detach().numpy().tobytes()).hexdigest() != before
