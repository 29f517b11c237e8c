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

from __future__ import annotations

import importlib
from typing import Any

# Lazy exports (PEP 562): ``singularity-run`` imports runtime.api and
# runtime.launcher without paying for ``import torch`` until it forks workers.
_EXPORTS = {
    "BufferPolicy": "api", "CheckpointError": "api", "CheckpointMeta": "api",
    "CheckpointReason": "api", "CorruptCheckpointError": "api", "HistoryRecord": "api",
    "JobShape": "api", "RuntimeSetupError": "api", "StopReason": "api",
    "CheckpointDirError": "api", "CheckpointKeyError": "api",
    "UntrustedCheckpointError": "api",
    "list_meta": "catalog", "read_history": "history",
    "Job": "job", "init": "job",
    "Step": "splice", "Trainer": "splice", "params_sha256": "splice",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
