"""A training script whose device 1 raises at its third step (for the
launcher's failure test)."""

import torch

from slurm_singularity import runtime

job = runtime.init()
model = torch.nn.Linear(4, 1)
data = torch.utils.data.TensorDataset(torch.randn(256, 4), torch.randn(256, 1))
trainer = job.trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data, batch_size=4)
for step in trainer.steps(10):
    for x, y in step.batches():
        ((model(x) - y) ** 2).mean().backward()
    if step.index == 2 and job.shape.device_rank == 1:
        raise RuntimeError("worker 1 fails on purpose")
