"""``runtime.init()``: what a worker knows about its job, and the process group.

Why a ``Job`` object: a worker must know its logical ranks, its torch device,
whether to reduce deterministically, where checkpoints go and whether a
preemption was asked for; all of this comes from the contract variables that
``singularity-run`` sets, and nothing else in the user's script should read
them. The device is a parameter (``init(device=...)``) so that a later
device proxy can hand the worker a proxy device instead of a local one.

The preemption handler only sets a flag; the devices agree on a step
boundary in ``splice.Trainer`` (flag, agreement, exit). Before the first
step the devices meet in ``rendezvous()``, bounded in time and responsive
to that flag.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from slurm_singularity import contract
from slurm_singularity.runtime.api import BufferPolicy, JobRuntimeError, JobShape

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
                dataset: Any, *, batch_size: int | None = None, **kwargs: Any) -> "Any":
        """A ``splice.Trainer`` for this job; see its docstring for options.
        Restores the newest valid checkpoint if there is one. ``batch_size``
        (per logical rank) may be left out when ``dataset`` is a DataLoader.

        :raises RuntimeSetupError: no batch size, or bad data or options.
        """
        from slurm_singularity.runtime.loader import batch_size_of
        from slurm_singularity.runtime.splice import Trainer
        return Trainer(self, model, optimizer, dataset,
                       batch_size=batch_size_of(dataset, batch_size), **kwargs)

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


class RendezvousError(JobRuntimeError):
    """The devices of a job did not all meet within the rendezvous timeout
    (a node that never came, an address that refuses); the message names
    the address, the timeout and the setting."""


#: How often the waiting main thread looks at the preemption flag (seconds).
RENDEZVOUS_POLL_S = 0.1

#: After a preemption signal, how long a rendezvous may still complete
#: (seconds): one that completes goes on to the first step boundary, where
#: the devices agree and checkpoint as usual; one that does not is given up.
#: The devices get the signal together and complete the rendezvous
#: together, so they decide alike; a rendezvous that completes within a
#: poll of this deadline on one device and not on another is the one window
#: where they could differ.
RENDEZVOUS_PREEMPT_GRACE_S = 1.0


def rendezvous(job: Job, backend: str) -> None:
    """Join the job's process group within ``contract.rendezvous_timeout_s``.

    Why a thread: the store's connect and the process group's set-up are C++
    calls that retry through EINTR, so a signal handler would not run until
    they return. The main thread waits for the rendezvous thread and looks
    at the preemption flag every ``RENDEZVOUS_POLL_S``: after a preemption
    the rendezvous has ``RENDEZVOUS_PREEMPT_GRACE_S`` to complete (then the
    first step boundary checkpoints), else the worker ends with the requeue
    code (no step was done, nothing to save); a rendezvous that fails or outlasts its
    timeout ends it with the requeue code too, after a message that names
    the address and the timeout (so the job does not hang holding its
    GPUs), and tells singularity-run that the run failed.
    """
    from datetime import timedelta

    shape = job.shape
    timeout_s = contract.rendezvous_timeout_s()
    addr = f"{contract.master_addr() or '?'}:{os.environ.get('MASTER_PORT', '?')}"
    outcome: dict[str, BaseException] = {}

    def meet() -> None:
        try:
            dist.init_process_group(backend, rank=shape.device_rank, world_size=shape.devices,
                                    timeout=timedelta(seconds=timeout_s))
        except BaseException as exc:   # reported by the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=meet, name="rendezvous", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s + 1.0   # torch's own timeout comes first
    give_up: float | None = None
    while thread.is_alive():
        thread.join(RENDEZVOUS_POLL_S)
        if job.preempt.requested and give_up is None:
            give_up = time.monotonic() + RENDEZVOUS_PREEMPT_GRACE_S
        if give_up is not None and thread.is_alive() and time.monotonic() > give_up:
            log.warning("%s: preempted during the rendezvous at %s; no step done, exiting %d",
                        job, addr, contract.REQUEUE_EXIT_CODE)
            _exit_now(contract.REQUEUE_EXIT_CODE)
        if time.monotonic() > deadline:
            outcome["error"] = TimeoutError(f"no answer within {timeout_s:g} s")
            break
    if "error" in outcome:
        reason = str(outcome["error"]).strip().splitlines()[0] if str(outcome["error"]).strip() \
            else type(outcome["error"]).__name__
        print(f"singularity-run: error: [device {shape.device_rank}] the rendezvous of "
              f"{shape.devices} devices at {addr} failed within {timeout_s:g} s "
              f"({contract.RENDEZVOUS_TIMEOUT_S}): {reason}; asking for a requeue",
              file=sys.stderr, flush=True)
        _report_failure("rendezvous")
        _exit_now(contract.REQUEUE_EXIT_CODE)


def _report_failure(what: str) -> None:
    """Tell singularity-run (worker 0's progress pipe) what failed."""
    fd = contract.progress_fd()
    if fd is not None:
        try:
            os.write(fd, f"fail {what}\n".encode())
        except OSError:
            pass


def _exit_now(code: int) -> None:
    """Exit while the rendezvous thread may still sit in a C++ call that
    would hold up an orderly interpreter exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
        rendezvous(job, "nccl" if dev.type == "cuda" else "gloo")
    if job.ckpt_dir is None:
        log.warning("%s: no checkpoint directory (SINGULARITY_CKPT_DIR); "
                    "this run cannot be resumed", job)
    log.info("%s: deterministic=%s", job, det)
    return job


__all__ = ["Job", "init", "select_device", "BufferPolicy"]
