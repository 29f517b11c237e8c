"""Train a LightningModule under the runtime with one Trainer argument:
``pl.Trainer(strategy=SingularityStrategy(), max_steps=N)``.

Why a strategy: it is the one place where Lightning lets a plug-in own the
device, the process and the loop around ``training_step``, and the user's
module, data and ``Trainer.fit`` call stay as they are. What it does: each
worker of ``singularity-run`` is one Lightning process on one device; at
``setup`` the strategy hands ``fit``'s loop to the runtime's ``Trainer``
(replica splicing of the job's ``W`` logical ranks over its ``D`` devices,
data sharded by logical rank, gradient reduction, checkpoint, restore, the
preemption signal): each step runs ``training_step`` once per logical rank
of the device (``self.log`` works; its values are this device's) and the
runtime steps the optimizer and the scheduler. A preemption checkpoints and
ends the process with ``contract.REQUEUE_EXIT_CODE`` through Lightning's
own teardown; the requeued job restores and goes on, with the same
parameters as an uninterrupted run in deterministic mode.

The subset of Lightning this covers, checked at ``setup`` with an error
that names what is not supported (``LightningSetupError``):

* automatic optimization, one optimizer, at most one LR scheduler stepped
  every step (``interval="step"``, ``frequency=1``);
* a ``train_dataloader`` over a map-style dataset with a ``batch_size``
  (its ``collate_fn`` is used; a ``RandomSampler`` means shuffled);
  ``num_workers`` is not used (the runtime loads in the worker);
* ``Trainer(max_steps=N)`` (the runtime counts steps, restored ones too);
  ``accumulate_grad_batches=1``; ``gradient_clip_val`` with the ``norm``
  algorithm; 32-bit precision;
* not run during ``fit``: validation, the per-batch and per-epoch hooks and
  callbacks (``on_train_batch_start/end``, ``on_train_epoch_*``, Lightning's
  own checkpoints: the runtime's replace them; pass
  ``enable_checkpointing=False``); ``on_fit_start``/``on_fit_end``,
  ``on_train_start``/``on_train_end`` run.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

try:
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import SingleDeviceStrategy
except ImportError as exc:   # pragma: no cover - depends on the install
    raise ImportError("slurm_singularity.runtime.integrations.lightning needs "
                      "pytorch-lightning: pip install 'slurm-singularity[lightning]'") from exc
from torch.utils.data import IterableDataset, RandomSampler

from slurm_singularity.runtime.api import BufferPolicy, RuntimeSetupError

log = logging.getLogger(__name__)


class LightningSetupError(RuntimeSetupError):
    """The Trainer or the LightningModule uses what ``SingularityStrategy``
    does not support; the message names it and what to do instead."""


class SingularityStrategy(SingleDeviceStrategy):
    """Lightning strategy that trains through the runtime's ``Trainer``.

    ``seed``: data order and the logical ranks' RNG streams (as
    ``job.trainer(seed=...)``); ``ckpt_every``: a periodic checkpoint every
    that many steps (None: only at preemption, ``SINGULARITY_CKPT_EVERY_S``
    and the end); ``buffers``: a ``BufferPolicy``; ``job``: a
    ``runtime.Job`` (default: ``runtime.init()``, called here, so build the
    strategy in the worker, under ``singularity-run``).
    After ``fit``, ``runtime_trainer`` is the runtime's ``Trainer``
    (``.step``, ``.params_sha256()``).

    :raises LightningSetupError: from ``fit``, for what is not supported.
    """

    def __init__(self, *, seed: int = 0, ckpt_every: int | None = None,
                 buffers: BufferPolicy = BufferPolicy.BROADCAST, job: Any = None) -> None:
        if job is None:
            from slurm_singularity import runtime
            job = runtime.init()
        self.job = job
        self.seed, self.ckpt_every, self.buffer_policy = seed, ckpt_every, buffers
        self.runtime_trainer: Any = None
        super().__init__(device=job.device)

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if trainer.training:
            trainer.fit_loop.run = lambda: self._fit(trainer)   # the loop is the runtime's

    # ---- what is supported -------------------------------------------------------
    def _check(self, trainer: pl.Trainer) -> tuple[Any, Any]:
        """(optimizer, scheduler or None). :raises LightningSetupError:"""
        module = trainer.lightning_module
        if len(self.optimizers) != 1:
            raise LightningSetupError(
                f"SingularityStrategy: configure_optimizers returned {len(self.optimizers)} "
                "optimizers; exactly one is supported")
        if not module.automatic_optimization:
            raise LightningSetupError(
                "SingularityStrategy: manual optimization (automatic_optimization=False) is "
                "not supported: the runtime steps the optimizer after each spliced step")
        if trainer.max_steps is None or trainer.max_steps < 1:
            raise LightningSetupError(
                f"SingularityStrategy: Trainer(max_steps={trainer.max_steps}): give the number "
                "of steps (max_steps=N); the runtime counts steps across requeues, not epochs")
        if trainer.accumulate_grad_batches != 1:
            raise LightningSetupError(
                f"SingularityStrategy: Trainer(accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}) is not supported: raise --world-size "
                "instead (each step already sums W micro-batches)")
        if str(trainer.precision) not in ("32-true", "32"):
            raise LightningSetupError(
                f"SingularityStrategy: Trainer(precision={trainer.precision!r}) is not "
                "supported; use 32-bit precision (bf16 autocast inside training_step works)")
        if trainer.gradient_clip_val and trainer.gradient_clip_algorithm != "norm":
            raise LightningSetupError(
                f"SingularityStrategy: gradient_clip_algorithm="
                f"{trainer.gradient_clip_algorithm!r}; only 'norm' is supported")
        configs = self.lr_scheduler_configs
        if len(configs) > 1:
            raise LightningSetupError(
                f"SingularityStrategy: {len(configs)} LR schedulers; at most one is supported")
        if configs and (configs[0].interval != "step" or configs[0].frequency != 1):
            raise LightningSetupError(
                f"SingularityStrategy: the LR scheduler has interval={configs[0].interval!r}, "
                f"frequency={configs[0].frequency}; only interval='step', frequency=1 is "
                "supported (the runtime steps it once per step)")
        return self.optimizers[0], (configs[0].scheduler if configs else None)

    def _data(self, trainer: pl.Trainer) -> tuple[Any, int, bool, Any]:
        """(dataset, batch_size, shuffle, collate). :raises LightningSetupError:"""
        loader = trainer.fit_loop._data_source.dataloader()
        dataset = getattr(loader, "dataset", None)
        if dataset is None or isinstance(dataset, IterableDataset) or \
                not hasattr(dataset, "__len__"):
            raise LightningSetupError(
                f"SingularityStrategy: train_dataloader returned {type(loader).__name__} over "
                f"{type(dataset).__name__}; a DataLoader over a map-style dataset (len and [i]) "
                "is supported")
        if not loader.batch_size:
            raise LightningSetupError(
                "SingularityStrategy: the train DataLoader has no batch_size (a batch_sampler?); "
                "give it batch_size=B, the micro-batch of one logical rank")
        shuffle = isinstance(loader.sampler, RandomSampler)
        return dataset, int(loader.batch_size), shuffle, loader.collate_fn

    # ---- the loop ----------------------------------------------------------------
    def _fit(self, trainer: pl.Trainer) -> None:
        optimizer, scheduler = self._check(trainer)
        dataset, batch_size, shuffle, collate = self._data(trainer)
        module = trainer.lightning_module
        clip = float(trainer.gradient_clip_val) if trainer.gradient_clip_val else None
        rt = self.job.trainer(module, optimizer, dataset, batch_size=batch_size,
                              scheduler=scheduler, seed=self.seed, shuffle=shuffle,
                              collate=collate, buffers=self.buffer_policy,
                              ckpt_every=self.ckpt_every, grad_clip=clip)
        self.runtime_trainer = rt
        module.train()
        with torch.enable_grad():
            for step in rt.steps(trainer.max_steps):
                for batch in step.batches():
                    module._current_fx_name = "training_step"
                    out = module.training_step(batch, step.index)
                    loss = out["loss"] if isinstance(out, dict) else out
                    if loss is None:
                        raise LightningSetupError(
                            "SingularityStrategy: training_step returned None (skipping a "
                            "batch) at step {}; every logical rank must return its loss"
                            .format(step.index))
                    loss.backward()
        self._set_global_step(trainer, rt.step)

    @staticmethod
    def _set_global_step(trainer: pl.Trainer, steps: int) -> None:
        """So that ``trainer.global_step`` says what the runtime did."""
        progress = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress
        progress.optimizer.step.total.completed = steps
