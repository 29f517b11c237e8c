"""Data sharding by logical rank, with a cursor that survives a restart.

Why not ``DistributedSampler``: it shards by *process* rank, and a process
here runs ``k`` logical ranks; and its position inside an epoch is lost at a
restart. ``RankShard`` gives logical rank ``r`` of ``W`` the same indices
DistributedSampler would (a seeded permutation per epoch, padded to a
multiple of ``W``, every ``W``-th index from ``r``), and its cursor
``(epoch, position)`` is part of every checkpoint, so a job resumes mid-epoch
on any number of devices and reads exactly the samples it would have read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import default_collate


@dataclass
class Cursor:
    """Where a logical rank is in its data: epoch and samples consumed in
    that epoch's shard."""

    epoch: int = 0
    position: int = 0

    def to_list(self) -> list[int]:
        return [self.epoch, self.position]

    @classmethod
    def from_list(cls, raw: Sequence[int]) -> "Cursor":
        epoch, position = (int(v) for v in raw)
        if epoch < 0 or position < 0:
            raise ValueError(f"data cursor {list(raw)!r} is negative")
        return cls(epoch, position)


class RankShard:
    """Micro-batches of one logical rank.

    Each epoch's shard holds ``ceil(N / W)`` indices; a micro-batch never
    crosses an epoch (the tail shorter than ``batch_size`` is dropped, like
    ``drop_last=True``).

    :raises ValueError: the shard is shorter than one micro-batch.
    """

    def __init__(self, dataset: Any, rank: int, world_size: int, batch_size: int, *,
                 seed: int = 0, shuffle: bool = True,
                 collate: Callable[[list[Any]], Any] = default_collate,
                 cursor: Cursor | None = None) -> None:
        self.dataset = dataset
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.collate = collate
        self.cursor = cursor or Cursor()
        total = len(dataset)
        self.shard_len = -(-total // world_size)
        if self.shard_len < batch_size:
            raise ValueError(
                f"dataset of {total} samples gives each of {world_size} logical ranks "
                f"{self.shard_len} samples, fewer than batch_size={batch_size}")
        self._epoch_indices: list[int] = []
        self._indices_epoch = -1

    def _indices(self, epoch: int) -> list[int]:
        if self._indices_epoch != epoch:
            total = len(self.dataset)
            if self.shuffle:
                gen = torch.Generator()
                gen.manual_seed(self.seed + epoch)
                order = torch.randperm(total, generator=gen).tolist()
            else:
                order = list(range(total))
            padded = self.shard_len * self.world_size
            pad = padded - total              # repeat the order, as DistributedSampler pads
            order += (order * -(-pad // total))[:pad]
            self._epoch_indices = order[self.rank:padded:self.world_size]
            self._indices_epoch = epoch
        return self._epoch_indices

    def next_indices(self) -> tuple[Cursor, list[int]]:
        """Where the next micro-batch starts and its dataset indices;
        advances the cursor (the batch is not read)."""
        if self.cursor.position + self.batch_size > self.shard_len:
            self.cursor = Cursor(self.cursor.epoch + 1, 0)
        idx = self._indices(self.cursor.epoch)
        start = self.cursor
        self.cursor = Cursor(start.epoch, start.position + self.batch_size)
        return start, idx[start.position:start.position + self.batch_size]

    def next_batch(self) -> Any:
        """The next micro-batch; advances the cursor."""
        _, indices = self.next_indices()
        return self.collate([self.dataset[i] for i in indices])
