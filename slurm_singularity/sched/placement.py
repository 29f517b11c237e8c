"""Node-level bookkeeping for the planner: which nodes give and take GPUs.

The planner decides sizes from the cluster's free GPU count; this module turns
those sizes into placements so that every start and grow it returns names
nodes that really have the GPUs. Jobs may span nodes. A job is packed onto the
node whose free count fits it most tightly (fewest GPUs stranded); a job
larger than a node takes the emptiest nodes first; a grow first fills the
nodes the job is already on. Shrinks release the job's smallest pieces first,
so that what stays is consolidated.

Nodes are kept in buckets by free count, so one allocation costs
O(GPUs per node), not O(nodes); iteration follows the input order, so the
result is deterministic.
"""

from __future__ import annotations

from typing import Iterable

#: Pseudo-node for devices of a running job whose placement was not given.
UNKNOWN_NODE = "*"


class NodePool:
    """Free GPUs per node, with best-fit allocation."""

    def __init__(self, nodes: Iterable[tuple[str, int, int]]) -> None:
        """``nodes``: ``(name, gpus, free_gpus)`` in a fixed order."""
        self.names: list[str] = []
        self.free: list[int] = []
        self.index: dict[str, int] = {}
        cap = 0
        for name, gpus, free in nodes:
            self.index[name] = len(self.names)
            self.names.append(name)
            self.free.append(free)
            cap = max(cap, gpus)
        self.max_gpus = cap
        self.buckets: list[dict[int, None]] = [dict() for _ in range(cap + 1)]
        for i, f in enumerate(self.free):
            self.buckets[f][i] = None
        #: Devices released by jobs without a known placement.
        self.unknown_free = 0

    def _set(self, i: int, value: int) -> None:
        del self.buckets[self.free[i]][i]
        self.free[i] = value
        self.buckets[value][i] = None

    def release(self, placement: tuple[tuple[str, int], ...], count: int) -> tuple[tuple[str, int], ...]:
        """Give back ``count`` of the job's devices; return what it keeps."""
        if not placement:
            self.unknown_free += count
            return ()
        order = sorted(range(len(placement)), key=lambda k: placement[k][1])
        keep = dict(placement)
        left = count
        for k in order:
            if left == 0:
                break
            name, n = placement[k]
            give = min(n, left)
            left -= give
            keep[name] -= give
            i = self.index.get(name)
            if i is None:
                self.unknown_free += give
            else:
                self._set(i, self.free[i] + give)
        return tuple((name, n) for name, n in keep.items() if n > 0)

    def take(self, placement: tuple[tuple[str, int], ...], count: int) -> tuple[tuple[str, int], ...]:
        """Add ``count`` devices to a job placed on ``placement``; return the new placement.

        The caller guarantees that ``count`` devices are free in total.
        """
        have = dict(placement)
        left = count
        for name in list(have):                      # grow in place first
            i = self.index.get(name)
            if i is None or left == 0:
                continue
            give = min(self.free[i], left)
            if give:
                self._set(i, self.free[i] - give)
                have[name] += give
                left -= give
        while left > 0:
            i = self._fit(left)
            if i is None:
                break
            give = min(self.free[i], left)
            self._set(i, self.free[i] - give)
            name = self.names[i]
            have[name] = have.get(name, 0) + give
            left -= give
        if left > 0:                                 # devices whose node is unknown
            give = min(left, self.unknown_free)
            self.unknown_free -= give
            have[UNKNOWN_NODE] = have.get(UNKNOWN_NODE, 0) + give
            left -= give
        if left > 0:
            raise RuntimeError(f"placement: {left} GPUs missing; the planner over-allocated")
        return tuple(have.items())

    def _fit(self, count: int) -> int | None:
        """The node whose free count fits ``count`` best, else the emptiest node."""
        buckets = self.buckets
        for f in range(min(count, self.max_gpus), self.max_gpus + 1):
            if f >= count and buckets[f]:
                return next(iter(buckets[f]))
        for f in range(self.max_gpus, 0, -1):
            if buckets[f]:
                return next(iter(buckets[f]))
        return None
