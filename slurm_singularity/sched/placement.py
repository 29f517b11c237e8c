"""Node-level bookkeeping for the planner: which nodes give and take GPUs.

The planner decides sizes from the cluster's free GPU count; this module turns
those sizes into placements so that every start and grow it returns names
nodes that really have the GPUs. Jobs may span nodes. A job is packed onto the
node whose free count fits it most tightly (fewest GPUs stranded); a job
larger than a node takes the emptiest nodes first; a grow first fills the
nodes the job is already on. Shrinks release the job's smallest pieces first,
so that what stays is consolidated.

The first few fits of a pass look the free counts up with ``list.index``
(a scan in C); a pass that places more builds buckets of nodes by free
count, after which one allocation costs O(GPUs per node), not O(nodes).
Building the buckets in Python was most of the simulator's time at 12,500
nodes, where a pass places only a job or two. Ties go to the first node in
input order (in a bucket, the first put there), so the result is
deterministic.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Sequence

from .api import NodeState

_FREE = attrgetter("free_gpus")
_GPUS = attrgetter("gpus")

#: Pseudo-node for devices of a running job whose placement was not given.
UNKNOWN_NODE = "*"

#: Fits a pass makes by scanning before it builds buckets (``NodePool._fit``).
SCAN_FITS = 8


class NodePool:
    """Free GPUs per node, with best-fit allocation.

    Built once per planning pass that places something, so construction is
    to a list copy; the buckets are built on the first fit and the name index
    when first needed.
    """

    def __init__(self, nodes: Sequence[NodeState]) -> None:
        self.nodes = nodes
        self.free: list[int] = list(map(_FREE, nodes))
        self._max_gpus = -1               # computed on the first fit
        self._index: dict[str, int] | None = None
        #: Nodes by free count (insertion = input order), built once a pass
        #: has fitted ``SCAN_FITS`` jobs by scanning.
        self._buckets: list[dict[int, None]] | None = None
        self._scans = 0
        #: Devices released by jobs without a known placement.
        self.unknown_free = 0

    @property
    def max_gpus(self) -> int:
        if self._max_gpus < 0:
            self._max_gpus = max(map(_GPUS, self.nodes), default=0)
        return self._max_gpus

    def index(self, name: str) -> int | None:
        if self._index is None:
            self._index = {n.name: i for i, n in enumerate(self.nodes)}
        return self._index.get(name)

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
            i = self.index(name)
            if i is None:
                self.unknown_free += give
            else:
                self._set(i, self.free[i] + give)
        return tuple((name, n) for name, n in keep.items() if n > 0)

    def _set(self, i: int, value: int) -> None:
        if self._buckets is not None:
            old = self.free[i]
            if old:
                del self._buckets[old][i]
            if value:
                self._buckets[value][i] = None
        self.free[i] = value

    def take(self, placement: tuple[tuple[str, int], ...], count: int) -> tuple[tuple[str, int], ...]:
        """Add ``count`` devices to a job placed on ``placement``; return the new placement.

        The caller guarantees that ``count`` devices are free in total.
        """
        have = dict(placement)
        left = count
        for name in list(have):                      # grow in place first
            i = self.index(name) if left else None
            if i is None:
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
            name = self.nodes[i].name
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
        """The first node whose free count fits ``count`` most tightly, else the emptiest."""
        buckets = self._buckets
        if buckets is None and self._scans < SCAN_FITS:
            self._scans += 1
            return self._scan(count)
        if buckets is None:
            buckets = self._buckets = [{} for _ in range(self.max_gpus + 1)]
            for i, f in enumerate(self.free):
                if f:
                    buckets[f][i] = None
        for f in range(min(count, self.max_gpus), self.max_gpus + 1):
            if f >= count and buckets[f]:
                return next(iter(buckets[f]))
        for f in range(self.max_gpus, 0, -1):
            if buckets[f]:
                return next(iter(buckets[f]))
        return None

    def _scan(self, count: int) -> int | None:
        """``_fit`` by scanning the free counts (no buckets): the first node
        whose free count fits ``count`` most tightly, else the emptiest."""
        free = self.free
        top = max(free, default=0)        # no node has more free than that
        for f in range(max(count, 1), top + 1):
            if f in free:
                return free.index(f)
        for f in range(min(count - 1, top), 0, -1):
            if f in free:
                return free.index(f)
        return None
