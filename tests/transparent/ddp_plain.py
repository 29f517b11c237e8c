"""An unmodified gloo DDP training script: nothing of slurm-singularity in
it. W=4 ranks started with torch.multiprocessing, a DataLoader with 2
workers per rank, its own epoch loop; rank 0 prints the final parameters'
sha256. Run as is (`python ddp_plain.py PORT EPOCHS OUT`)."""

import hashlib
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

WORLD = 4


def run(rank, port, epochs, out):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 32, generator=g)
    y = (x.sum(dim=1, keepdim=True) > 0).float()
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, num_replicas=WORLD, rank=rank, shuffle=True, seed=3)
    loader = DataLoader(data, batch_size=16, sampler=sampler, num_workers=2)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    step = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
            step += 1
            if rank == 0:
                with open(out, "a") as f:
                    print(f"step {step} epoch {epoch}", file=f)
            time.sleep(0.02)
    if rank == 0:
        h = hashlib.sha256()
        for p in model.module.parameters():
            h.update(p.detach().numpy().tobytes())
        with open(out, "a") as f:
            print(f"final step={step} params_sha256={h.hexdigest()}", file=f)
    dist.destroy_process_group()


if __name__ == "__main__":
    port, epochs, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    mp.spawn(run, args=(port, epochs, out), nprocs=WORLD)
