"""Gradient reduction of the W logical ranks, once per step across devices.

Why three paths: floating-point addition is not associative, so summing
``k`` ranks on a device and then all-reducing the device sums gives bits that
depend on ``D``. Deterministic mode therefore defines the gradient as the
left fold ``(((g0 + g1) + g2) + ...) + g(W-1)`` in logical-rank order, then
divided by ``W`` (DDP's mean):

* ``D == 1``: autograd's own accumulation into ``.grad`` across the ``k``
  turns *is* that left fold, so nothing is copied and no collective runs:
  the cost is that of plain gradient accumulation.
* ``D > 1``, deterministic: each turn's gradient is copied into a
  ``[k, N]`` slot buffer, the slots are all-gathered (``[W, N]``) and every
  device folds them in rank order, so the optimizer sees identical bits.
* ``D > 1``, fast: accumulate locally, one all-reduce of the flat sum.

With gradient accumulation (``accumulate = n`` micro-batches per rank and
step) a rank's gradient is the sum over its micro-batches, in order, and the
fold adds those per-rank sums; so even ``D == 1`` copies each rank's sum
into a slot (autograd alone would interleave the ranks' micro-batches).

A parameter that received a gradient on some logical ranks and not on
others counts zeros for the others (as DDP's reducer with
``find_unused_parameters`` does); one that received none on any rank keeps
``grad = None``, as under DDP, so an optimizer such as AdamW leaves it alone
(no weight decay, no momentum step). Each rank's "had a gradient" flags
travel with its gradients (one extra element per parameter), so this costs
no extra collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class GradReducer:
    """Collects each logical rank's gradient during a step and leaves the
    reduced mean gradient in ``p.grad`` for the optimizer."""

    def __init__(self, params: list[torch.nn.Parameter], *, world_size: int, devices: int,
                 splice: int, deterministic: bool, accumulate: int = 1) -> None:
        self.params = params
        self.world_size = world_size
        self.devices = devices
        self.splice = splice
        # with accumulation a rank's gradient is the sum of its micro-batches'
        # and the fold adds those sums, so even D == 1 keeps one slot per rank
        self.gather = deterministic and (devices > 1 or accumulate > 1)
        self.numel = sum(p.numel() for p in params)
        self._slots: torch.Tensor | None = None
        self._gathered: list[torch.Tensor] = []
        #: per parameter: some logical rank of this device gave it a gradient
        #: this step (when all did, no rank anywhere lacks one: no flags read)
        self._local_had = [False] * len(params)

    def begin_step(self) -> None:
        for p in self.params:
            p.grad = None
        self._local_had = [False] * len(self.params)

    def end_turn(self, turn: int) -> None:
        """After logical rank number ``turn`` (0..k-1 on this device) ran
        its backward pass."""
        if not self.gather:
            return
        if self._slots is None:
            dev = self.params[0].device
            dtype = self.params[0].dtype
            width = self.numel + len(self.params)        # gradients, then flags
            self._slots = torch.empty(self.splice, width, device=dev, dtype=dtype)
            self._gathered = [torch.empty_like(self._slots) for _ in range(self.devices)]
        row = self._slots[turn]
        offset = 0
        had = []
        for p in self.params:
            n = p.numel()
            view = row[offset:offset + n].view_as(p)
            if p.grad is None:
                view.zero_()
            else:
                view.copy_(p.grad)
            had.append(float(p.grad is not None))
            p.grad = None
            offset += n
        self._local_had = [a or bool(h) for a, h in zip(self._local_had, had)]
        flags = torch.tensor(had, dtype=row.dtype).to(row.device)
        row[self.numel:].view_as(flags).copy_(flags)     # a view, as the gradients' (the proxy)

    def finish(self) -> None:
        """Leave the mean over the W logical ranks in every ``p.grad``."""
        if self.gather:
            self._fold_gathered()
            return
        if self.devices > 1:
            self._local_had = [p.grad is not None for p in self.params]
            had = torch.tensor([float(h) for h in self._local_had],
                               dtype=self.params[0].dtype).to(self.params[0].device)
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1) for p in self.params] + [had])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            self._scatter(flat)
            self._drop_unused(flat[self.numel:])
        for p in self.params:
            if p.grad is not None:
                p.grad.div_(self.world_size)

    def _drop_unused(self, had: torch.Tensor) -> None:
        """``grad = None`` for parameters no logical rank gave a gradient.
        Reads the flags (a wait for the device) only when some parameter got
        no gradient from this device's ranks."""
        if all(self._local_had):
            return
        for p, count in zip(self.params, had.cpu().tolist()):
            if count == 0:
                p.grad = None

    def _fold_gathered(self) -> None:
        if self._slots is None:
            raise RuntimeError("GradReducer.finish before any end_turn: no gradients collected")
        if self.devices > 1:
            dist.all_gather(self._gathered, self._slots)
        else:
            self._gathered = [self._slots]
        total = self._gathered[0][0].clone()
        for d, block in enumerate(self._gathered):
            for j in range(self.splice):
                if d or j:
                    total.add_(block[j])
        total.div_(self.world_size)
        self._scatter(total, as_views=True)
        self._drop_unused(total[self.numel:])

    def _scatter(self, flat: torch.Tensor, as_views: bool = False) -> None:
        offset = 0
        for p in self.params:
            n = p.numel()
            piece = flat[offset:offset + n].view_as(p)
            if as_views:
                p.grad = piece
            else:
                p.grad.copy_(piece)
            offset += n
