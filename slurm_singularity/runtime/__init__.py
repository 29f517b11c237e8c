"""The runtime: what runs inside a job (launcher, replica splicing,
deterministic reduction, consistent checkpoint and restore, preemption).

A DDP script changes a few lines to use it::

    from slurm_singularity import runtime
    job = runtime.init()
    model = Net().to(job.device)
    opt = torch.optim.AdamW(model.parameters())
    trainer = job.trainer(model, opt, dataset, batch_size=16, seed=0)
    for step in trainer.steps(total_steps):
        for x, y in step.batches():
            F.cross_entropy(model(x), y).backward()

See docs/runtime.md.
"""

from slurm_singularity.runtime.api import (
    BufferPolicy, CheckpointError, CheckpointMeta, CheckpointReason, CorruptCheckpointError,
    HistoryRecord, JobShape, RuntimeSetupError, StopReason,
)
from slurm_singularity.runtime.checkpoint import list_meta
from slurm_singularity.runtime.history import read_history
from slurm_singularity.runtime.job import Job, init
from slurm_singularity.runtime.splice import Step, Trainer, params_sha256

__all__ = [
    "BufferPolicy", "CheckpointError", "CheckpointMeta", "CheckpointReason",
    "CorruptCheckpointError", "HistoryRecord", "Job", "JobShape", "RuntimeSetupError",
    "Step", "StopReason", "Trainer", "init", "list_meta", "params_sha256", "read_history",
]
