"""``runtime.init()``: what a worker knows about its job, and the process group.

Why a ``Job`` object: a worker must know its logical ranks, its torch device,
whether to reduce deterministically, where checkpoints go and whether a
preemption was asked for; all of this comes from the contract variables that
``singularity-run`` sets, and nothing else in the user's script should read
them. The device is a parameter (``init(device=...)``) so that a later
device proxy can hand the worker a proxy device instead of a local one.

The preemption handler only sets a flag; the devices agree on a step
boundary in ``splice.Trainer`` (flag, agreement, exit).
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from slurm_singularity import contract
from slurm_singularity.runtime.api import BufferPolicy, JobShape

log = logging.getLogger(__name__)


@dataclass
class PreemptFlag:
    """Set by the signal handler, read at step boundaries."""

    signum: int | None = None

    def set(self, signum: int, _frame: Any = None) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


#: The flag of this process: set up early by the launcher's worker bootstrap
#: (so a signal between fork and ``init()`` is not lost) or by ``init()``.
_PROCESS_FLAG = PreemptFlag()


def install_preempt_handler() -> PreemptFlag:
    """Point the preemption signals at this process's flag (main thread
    only; elsewhere the flag is returned without a handler)."""
    if threading.current_thread() is threading.main_thread():
        for signum in contract.preempt_signals():
            signal.signal(signum, _PROCESS_FLAG.set)
    return _PROCESS_FLAG


@dataclass
class Job:
    """This worker's view of the job. Build it with ``init()``."""

    shape: JobShape
    device: torch.device
    deterministic: bool
    ckpt_dir: Path | None
    ckpt_every_s: float | None = None
    preempt: PreemptFlag = field(default_factory=PreemptFlag)

    @property
    def is_main(self) -> bool:
        """True on device 0, the one that writes checkpoints and prints."""
        return self.shape.device_rank == 0

    @property
    def distributed(self) -> bool:
        return self.shape.devices > 1

    def trainer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                dataset: Any, *, batch_size: int, **kwargs: Any) -> "Any":
        """A ``splice.Trainer`` for this job; see its docstring for options.
        Restores the newest valid checkpoint if there is one."""
        from slurm_singularity.runtime.splice import Trainer
        return Trainer(self, model, optimizer, dataset, batch_size=batch_size, **kwargs)

    def close(self) -> None:
        """Leave the process group (idempotent)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def __str__(self) -> str:
        s = self.shape
        return (f"[device {s.device_rank}/{s.devices}] W={s.world_size} k={s.splice} "
                f"ranks {s.logical_ranks.start}..{s.logical_ranks.stop - 1} on {self.device}")


def select_device(explicit: torch.device | str | None = None) -> torch.device:
    """The torch device this worker computes on: ``explicit`` if given (the
    seam for a device proxy), else the one CUDA device singularity-run left
    visible to this worker, else the CPU (an emulated device)."""
    if explicit is None:
        explicit = contract.worker_device()   # the device proxy's worker entry sets it
    if explicit is not None:
        return torch.device(explicit)
    if contract.cuda_visible_devices() and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def init(device: torch.device | str | None = None, *,
         deterministic: bool | None = None) -> Job:
    """Set this worker up from the contract variables singularity-run set
    (or as a lone device when started by hand): the job shape, the device,
    the process group across devices (gloo on CPU, NCCL on GPU) and the
    preemption handler.

    In deterministic mode (``contract.deterministic()``, default on) CPU
    workers use one thread, so that every ``D`` computes the same bits.

    :raises RuntimeSetupError: W is not a multiple of D, or a bad device rank.
    :raises contract.ContractError: a contract variable is malformed.
    """
    devices = contract.devices() or 1
    shape = JobShape(world_size=contract.world_size() or devices, devices=devices,
                     device_rank=contract.device_rank())
    dev = select_device(device)
    det = contract.deterministic() if deterministic is None else deterministic
    if det and dev.type == "cpu":
        torch.set_num_threads(1)
    ckpt = contract.ckpt_dir()
    job = Job(shape=shape, device=dev, deterministic=det,
              ckpt_dir=Path(ckpt) if ckpt else None, ckpt_every_s=contract.ckpt_every_s(),
              preempt=install_preempt_handler())
    if job.distributed and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=shape.device_rank, world_size=shape.devices)
    if job.ckpt_dir is None:
        log.warning("%s: no checkpoint directory (SINGULARITY_CKPT_DIR); "
                    "this run cannot be resumed", job)
    log.info("%s: deterministic=%s", job, det)
    return job


__all__ = ["Job", "init", "select_device", "BufferPolicy"]
