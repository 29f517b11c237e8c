"""Data pipelines of the logical ranks: what the trainer accepts as data, and
how each kind feeds every logical rank the stream it would get on any D.

Why not hand the user's ``DataLoader`` its own iteration: a DataLoader shards
by process (or not at all), seeds its workers from a global generator, and
forgets its position at a restart; here a process runs ``k`` logical ranks
and must resume mid-epoch on another number of devices. So the trainer takes
a DataLoader apart (dataset, collate_fn, num_workers, prefetch_factor,
pin_memory, worker_init_fn, shuffle) and rebuilds the pipeline around the
logical ranks:

* a map-style dataset, no workers: ``data.RankShard`` reads and collates in
  the rank's turn (on the rank's RNG stream), as before;
* a map-style dataset with workers (``WorkerFeed``): one DataLoader per
  device serves its ``k`` logical ranks in turn order; each micro-batch is a
  pure function of ``(seed, logical rank, epoch, position)``: the worker
  seeds torch's CPU generator, ``random`` and numpy from it before reading and
  collating, so random augmentation is the same on any D, any number of
  workers and across resumes; prefetching never moves a rank's cursor, only
  consumption does;
* an ``IterableDataset``: see ``StreamShard`` for the protocol (sharding,
  epochs, skip-count position); read in the main process (``StreamShard``)
  or, with workers, by a DataLoader per logical rank (``StreamFeed``) whose
  workers each read the rank's stream and collate every n-th micro-batch,
  seeded as above.

Anything else is refused when the trainer is built, naming what was passed
and what is accepted.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import multiprocessing.util
import random
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import (
    DataLoader, IterableDataset, RandomSampler, SequentialSampler, default_collate,
)

from slurm_singularity.runtime.api import JobShape, RuntimeSetupError
from slurm_singularity.runtime.data import Cursor, RankShard

log = logging.getLogger(__name__)

#: Signals a DataLoader worker ignores: the step's process group receives
#: the preemption signal, and a worker that died of it would fail the step
#: that the main process is about to checkpoint. The main process stops the
#: workers itself.
WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

ACCEPTED = ("a map-style dataset (len() and [i]), a torch.utils.data.IterableDataset, "
            "or a torch.utils.data.DataLoader over either")


@dataclass(frozen=True)
class Pipeline:
    """What feeds the logical ranks, once a DataLoader is taken apart."""

    dataset: Any
    """Map-style or ``IterableDataset``; never a DataLoader."""
    collate: Callable[[list[Any]], Any]
    """Turns a list of samples into a micro-batch (``default_collate``)."""
    shuffle: bool
    """Map-style only: a seeded permutation per epoch, as DistributedSampler."""
    num_workers: int = 0
    """Worker processes per device (0: read in the main process)."""
    prefetch_factor: int | None = None
    """Micro-batches each worker reads ahead (torch's default, 2, when None)."""
    pin_memory: bool = False
    """Pin micro-batches in page-locked memory; only with a CUDA device."""
    worker_init_fn: Callable[[int], None] | None = None
    """Called in each worker with its id, after the runtime's own set-up."""
    timeout: float = 0
    """Seconds to wait for a worker's micro-batch (0: no limit)."""

    @property
    def iterable(self) -> bool:
        return isinstance(self.dataset, IterableDataset)


def pipeline_of(data: Any, *, batch_size: int, shuffle: bool,
                collate: Callable[[list[Any]], Any]) -> Pipeline:
    """Check what the trainer was given as ``dataset``; take a DataLoader apart.

    :raises RuntimeSetupError: names what was passed and what is accepted.
    """
    if isinstance(data, DataLoader):
        return _from_loader(data, batch_size=batch_size, collate=collate)
    if isinstance(data, IterableDataset):
        return Pipeline(data, collate, shuffle=False)
    if isinstance(data, (str, bytes)) or not (hasattr(data, "__len__")
                                              and hasattr(data, "__getitem__")):
        raise RuntimeSetupError(f"dataset={_describe(data)} is not accepted: pass {ACCEPTED}")
    return Pipeline(data, collate, shuffle=shuffle)


def batch_size_of(data: Any, batch_size: int | None) -> int:
    """The trainer's batch size per logical rank: as given, else the
    DataLoader's.

    :raises RuntimeSetupError: neither gives one.
    """
    if batch_size is not None:
        return batch_size
    if isinstance(data, DataLoader) and data.batch_size is not None:
        return data.batch_size
    raise RuntimeSetupError("batch_size (samples per logical rank) is required unless the "
                            "dataset is a DataLoader with a batch_size")


def _describe(obj: Any) -> str:
    text = repr(obj)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} (a {type(obj).__module__}.{type(obj).__qualname__})"


def _from_loader(loader: DataLoader, *, batch_size: int,
                 collate: Callable[[list[Any]], Any]) -> Pipeline:
    what = f"dataset=DataLoader over {type(loader.dataset).__qualname__}"
    if loader.batch_size is None:
        raise RuntimeSetupError(
            f"{what} has batch_size=None (the dataset batches itself); the runtime needs "
            f"the DataLoader's batch_size (samples per logical rank)")
    if loader.batch_size != batch_size:
        raise RuntimeSetupError(
            f"{what} has batch_size={loader.batch_size}, the trainer was given "
            f"batch_size={batch_size}: they must agree (samples per logical rank)")
    if collate is not default_collate:
        raise RuntimeSetupError(
            f"{what} and collate={collate!r} both given: pass collate_fn in the DataLoader")
    iterable = isinstance(loader.dataset, IterableDataset)
    sampler = loader.sampler
    if iterable:
        shuffle = False
    elif type(sampler) is RandomSampler and not sampler.replacement \
            and sampler._num_samples is None:
        shuffle = True
    elif type(sampler) is SequentialSampler:
        shuffle = False
    else:
        raise RuntimeSetupError(
            f"{what} has sampler={type(sampler).__qualname__}: the runtime shards the "
            f"dataset by logical rank itself; pass shuffle=True or False, no sampler")
    if not iterable and type(loader.batch_sampler).__qualname__ != "BatchSampler":
        raise RuntimeSetupError(
            f"{what} has batch_sampler={type(loader.batch_sampler).__qualname__}: the "
            f"runtime makes the micro-batches itself; pass batch_size, no batch_sampler")
    return Pipeline(loader.dataset, loader.collate_fn or default_collate, shuffle=shuffle,
                    num_workers=loader.num_workers, prefetch_factor=loader.prefetch_factor,
                    pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                    timeout=loader.timeout)


def rank_sources(pipeline: Pipeline, shape: JobShape, batch_size: int, *, seed: int,
                 device: torch.device, job: str = "") -> dict[int, Any]:
    """One source per logical rank of this device, each with ``cursor``
    (read and set) and ``next_batch()``.

    :raises ValueError: a rank's shard is shorter than one micro-batch.
    """
    ranks = shape.logical_ranks
    if pipeline.iterable and pipeline.num_workers:
        return {r: StreamFeed(pipeline, r, shape.world_size, batch_size, seed=seed,
                              device=device, job=job) for r in ranks}
    if pipeline.iterable:
        return {r: StreamShard(copy.copy(pipeline.dataset), r, shape.world_size, batch_size,
                               collate=pipeline.collate) for r in ranks}
    if pipeline.num_workers == 0:
        return {r: RankShard(pipeline.dataset, r, shape.world_size, batch_size, seed=seed,
                             shuffle=pipeline.shuffle, collate=pipeline.collate)
                for r in ranks}
    feed = WorkerFeed(pipeline, shape, batch_size, seed=seed, device=device, job=job)
    return {r: feed.rank(r) for r in ranks}


# ---- map-style with workers ---------------------------------------------------
def batch_seed(seed: int, rank: int, epoch: int, position: int) -> int:
    """Seed of the micro-batch of logical rank ``rank`` that starts at
    ``position`` of ``epoch``'s shard (independent of D and of the workers)."""
    raw = f"{seed}/{rank}/{epoch}/{position}".encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class BatchKey:
    """What a worker needs to make one micro-batch."""

    rank: int
    cursor: Cursor
    indices: tuple[int, ...]
    seed: int


class _KeyedBatches(torch.utils.data.Dataset):
    """Runs in the workers: a key in, ``(key, micro-batch)`` out."""

    def __init__(self, dataset: Any, collate: Callable[[list[Any]], Any]) -> None:
        self.dataset = dataset
        self.collate = collate

    def __getitem__(self, key: BatchKey) -> tuple[BatchKey, Any]:
        seed_all(key.seed)
        return key, self.collate([self.dataset[i] for i in key.indices])


def seed_all(seed: int) -> None:
    """Seed torch's CPU, ``random``'s and (if imported) numpy's global
    generators. Only the CPU generator: a DataLoader worker cannot use CUDA,
    and ``torch.manual_seed`` costs ~0.4 ms a call (it looks for every
    accelerator), which would add that to every micro-batch."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed % 2**32)


def _as_is(batch: Any) -> Any:
    return batch


class _WorkerInit:
    def __init__(self, user_fn: Callable[[int], None] | None) -> None:
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        for signum in WORKER_IGNORED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        if self.user_fn is not None:
            self.user_fn(worker_id)


class _Keys:
    """The micro-batch keys of a device's ranks, in turn order, for ever;
    iterated in the main process (the DataLoader's sampler)."""

    def __init__(self, shards: list[RankShard], seed: int) -> None:
        self.shards = shards
        self.seed = seed

    def __iter__(self) -> Iterator[BatchKey]:
        while True:
            for shard in self.shards:
                cursor, indices = shard.next_indices()
                yield BatchKey(shard.rank, cursor, tuple(indices),
                               batch_seed(self.seed, shard.rank, cursor.epoch, cursor.position))


class _Workers:
    """The worker processes of one DataLoader: started on demand, stopped
    when the cursor is set (restore) and before the process exits."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.it: Iterator[Any] | None = None
        self._exit_hook = False

    def start(self, loader: DataLoader) -> Iterator[Any]:
        self.it = iter(loader)
        if not self._exit_hook:
            # before multiprocessing's exit handler joins its daemonic
            # children (the workers ignore its SIGTERM), at interpreter exit
            # and at the end of a multiprocessing child alike
            multiprocessing.util.Finalize(self, self.close, exitpriority=10)
            self._exit_hook = True
        log.info("%s: %d data workers started", self.what, loader.num_workers)
        return self.it

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        it, self.it = self.it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _worker_loader(pipeline: Pipeline, dataset: Any, *, sampler: Any, seed: int,
                   device: torch.device) -> DataLoader:
    """A DataLoader whose workers make whole micro-batches (``dataset``
    yields them), with the user's worker settings."""
    return DataLoader(
        dataset, batch_size=None, sampler=sampler, num_workers=pipeline.num_workers,
        collate_fn=_as_is, prefetch_factor=pipeline.prefetch_factor,
        pin_memory=pipeline.pin_memory and device.type == "cuda",
        worker_init_fn=_WorkerInit(pipeline.worker_init_fn), timeout=pipeline.timeout,
        # the workers' base seed is drawn from this generator, not from the
        # global one, whose state is the logical rank's RNG stream
        generator=torch.Generator().manual_seed(seed))


class WorkerFeed:
    """One DataLoader with workers for a device's ``k`` logical ranks.

    The ranks' cursors move when the trainer takes a micro-batch, never when
    a worker reads ahead; setting a cursor (restore) restarts the workers
    from the new positions.
    """

    def __init__(self, pipeline: Pipeline, shape: JobShape, batch_size: int, *, seed: int,
                 device: torch.device, job: str = "") -> None:
        self.pipeline, self.shape, self.batch_size = pipeline, shape, batch_size
        self.seed, self.device, self.job = seed, device, job
        self.cursors = {r: Cursor() for r in shape.logical_ranks}
        # checks the shard length now, not at the first batch
        RankShard(pipeline.dataset, shape.logical_ranks.start, shape.world_size, batch_size)
        self.workers = _Workers(f"{job} logical ranks {shape.logical_ranks.start}.."
                                f"{shape.logical_ranks.stop - 1}")

    def rank(self, rank: int) -> "_FedRank":
        return _FedRank(self, rank)

    def next_for(self, rank: int) -> Any:
        it = self.workers.it if self.workers.it is not None else self._start()
        key, batch = next(it)
        if key.rank != rank:
            raise RuntimeError(f"{self.job}: micro-batch of logical rank {key.rank} came "
                               f"when rank {rank} asked; take the ranks' batches in turn order")
        self.cursors[rank] = Cursor(key.cursor.epoch, key.cursor.position + self.batch_size)
        return batch

    def _start(self) -> Iterator[tuple[BatchKey, Any]]:
        p = self.pipeline
        shards = [RankShard(p.dataset, r, self.shape.world_size, self.batch_size,
                            seed=self.seed, shuffle=p.shuffle, cursor=self.cursors[r])
                  for r in self.shape.logical_ranks]
        return self.workers.start(_worker_loader(
            p, _KeyedBatches(p.dataset, p.collate), sampler=_Keys(shards, self.seed),
            seed=self.seed, device=self.device))

    def close(self) -> None:
        """Stop the workers (idempotent); they ignore the preemption signals."""
        self.workers.close()


class _FedRank:
    """One logical rank's view of a ``WorkerFeed``."""

    def __init__(self, feed: WorkerFeed, rank: int) -> None:
        self.feed = feed
        self.rank = rank

    @property
    def cursor(self) -> Cursor:
        return self.feed.cursors[self.rank]

    @cursor.setter
    def cursor(self, value: Cursor) -> None:
        self.feed.close()
        self.feed.cursors[self.rank] = value

    def next_batch(self) -> Any:
        return self.feed.next_for(self.rank)


# ---- IterableDataset -----------------------------------------------------------
class _IsolatedRng:
    """Runs a block without touching torch's, ``random``'s or numpy's state."""

    def __enter__(self) -> None:
        self.np = sys.modules.get("numpy")
        self.saved = (torch.get_rng_state(), random.getstate(),
                      self.np.random.get_state() if self.np is not None else None)

    def __exit__(self, *exc: Any) -> None:
        torch.set_rng_state(self.saved[0])
        random.setstate(self.saved[1])
        if self.np is not None:
            self.np.random.set_state(self.saved[2])


def open_rank_stream(dataset: Any, rank: int, world_size: int, cursor: Cursor) -> Iterator[Any]:
    """Logical rank ``rank``'s samples of ``cursor.epoch`` from ``cursor.position`` on
    (the protocol of ``StreamShard``); the skipped samples are read with the
    global RNG states saved and put back.

    :raises RuntimeSetupError: the epoch has fewer samples than the position.
    """
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(cursor.epoch)
    if hasattr(dataset, "shard"):
        it = iter(dataset.shard(rank, world_size))
    else:
        it = itertools.islice(iter(dataset), rank, None, world_size)
    if cursor.position:
        with _IsolatedRng():
            skipped = sum(1 for _ in itertools.islice(it, cursor.position))
        if skipped < cursor.position:
            raise RuntimeSetupError(
                f"IterableDataset gives logical rank {rank} {skipped} samples in epoch "
                f"{cursor.epoch}, the checkpoint's position is {cursor.position}: not the "
                f"dataset the checkpoint was written with")
    return it


def _too_short(rank: int, world_size: int, got: int, epoch: int, batch_size: int) -> Exception:
    return RuntimeSetupError(
        f"IterableDataset gives logical rank {rank} of {world_size} {got} samples in epoch "
        f"{epoch}, fewer than batch_size={batch_size}")


class StreamShard:
    """Micro-batches of one logical rank from an ``IterableDataset``, read in
    the main process.

    The protocol (docs/runtime.md, "Data pipelines"):

    * Sharding: if the dataset has ``shard(rank, world_size)``, its result is
      logical rank ``rank``'s stream; otherwise the rank gets every
      ``world_size``-th sample of the whole stream from sample ``rank``.
    * Epochs: ``set_epoch(epoch)`` is called, if the dataset has it, before
      each pass; a pass ends when the stream does; its tail shorter than a
      micro-batch is dropped. Each logical rank iterates its own shallow copy
      of the dataset.
    * Position: the samples taken in the epoch (skip-count). On resume the
      runtime opens the epoch's stream and discards that many samples, with
      the global RNGs saved and put back around it, so a stream must draw
      its randomness from a generator of its own seeded from the epoch.
      The collate runs in the rank's turn, on the rank's RNG stream.

    :raises RuntimeSetupError: an epoch gives fewer samples than one
        micro-batch, or fewer than the restored position.
    """

    def __init__(self, dataset: Any, rank: int, world_size: int, batch_size: int, *,
                 collate: Callable[[list[Any]], Any] = default_collate,
                 cursor: Cursor | None = None) -> None:
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self.batch_size, self.collate = batch_size, collate
        self._cursor = cursor or Cursor()
        self._it: Iterator[Any] | None = None

    @property
    def cursor(self) -> Cursor:
        return self._cursor

    @cursor.setter
    def cursor(self, value: Cursor) -> None:
        self._cursor = value
        self._it = None

    def _open(self) -> Iterator[Any]:
        return open_rank_stream(self.dataset, self.rank, self.world_size, self._cursor)

    def next_batch(self) -> Any:
        """The next micro-batch; advances the cursor."""
        if self._it is None:
            self._it = self._open()
        items = list(itertools.islice(self._it, self.batch_size))
        if len(items) < self.batch_size:
            self.cursor = Cursor(self._cursor.epoch + 1, 0)
            self._it = self._open()
            items = list(itertools.islice(self._it, self.batch_size))
            if len(items) < self.batch_size:
                raise _too_short(self.rank, self.world_size, len(items),
                                 self._cursor.epoch, self.batch_size)
        self._cursor = Cursor(self._cursor.epoch, self._cursor.position + self.batch_size)
        return self.collate(items)


class _StreamBatches(IterableDataset):
    """Runs in the workers of one logical rank: its micro-batches from a
    cursor on, epoch after epoch; worker ``w`` of ``n`` reads the whole
    stream and makes the micro-batches ``b`` with ``b % n == w``, which the
    DataLoader, asking its workers in turn, hands out in stream order."""

    def __init__(self, dataset: Any, rank: int, world_size: int, batch_size: int,
                 collate: Callable[[list[Any]], Any], cursor: Cursor, seed: int) -> None:
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self.batch_size, self.collate, self.cursor, self.seed = batch_size, collate, cursor, seed

    def __iter__(self) -> Iterator[tuple[Cursor, Any]]:
        info = torch.utils.data.get_worker_info()
        me, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        cursor, count = self.cursor, 0
        while True:
            it = open_rank_stream(self.dataset, self.rank, self.world_size, cursor)
            fresh = cursor.position == 0
            while True:
                items = list(itertools.islice(it, self.batch_size))
                if len(items) < self.batch_size:
                    break
                if count % workers == me:
                    seed_all(batch_seed(self.seed, self.rank, cursor.epoch, cursor.position))
                    yield cursor, self.collate(items)
                count += 1
                cursor = Cursor(cursor.epoch, cursor.position + self.batch_size)
            if fresh and cursor.position == 0:
                raise _too_short(self.rank, self.world_size, len(items), cursor.epoch,
                                 self.batch_size)
            cursor = Cursor(cursor.epoch + 1, 0)


class StreamFeed:
    """One logical rank's ``IterableDataset`` read by its own DataLoader
    workers; each micro-batch is collated with the RNGs seeded from
    ``(seed, rank, epoch, position)``, as ``WorkerFeed``'s are."""

    def __init__(self, pipeline: Pipeline, rank: int, world_size: int, batch_size: int, *,
                 seed: int, device: torch.device, job: str = "") -> None:
        self.pipeline, self.rank, self.world_size = pipeline, rank, world_size
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.dataset = copy.copy(pipeline.dataset)
        self._cursor = Cursor()
        self.workers = _Workers(f"{job} logical rank {rank}")

    @property
    def cursor(self) -> Cursor:
        return self._cursor

    @cursor.setter
    def cursor(self, value: Cursor) -> None:
        self.workers.close()
        self._cursor = value

    def next_batch(self) -> Any:
        it = self.workers.it if self.workers.it is not None else self._start()
        start, batch = next(it)
        self._cursor = Cursor(start.epoch, start.position + self.batch_size)
        return batch

    def _start(self) -> Iterator[tuple[Cursor, Any]]:
        p = self.pipeline
        stream = _StreamBatches(self.dataset, self.rank, self.world_size, self.batch_size,
                                p.collate, self._cursor, self.seed)
        return self.workers.start(_worker_loader(p, stream, sampler=None, seed=self.seed,
                                                 device=self.device))
