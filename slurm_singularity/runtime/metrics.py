"""Metrics reduced over the W logical ranks, the same bits on every D.

Why: a script that prints ``loss.item()`` after ``step.batches()`` prints the
last logical rank of its own device, which depends on D (rank 7 on D=1,
rank 3 on device 0 of D=2). A metric here is recorded by every logical rank
in its turn (``step.record``) and reduced after the turns
(``step.reduce``): the devices all-gather their ranks' values (one small
collective), and every device folds the W values in logical-rank order in
float64, so the result does not depend on how the ranks are spread over the
devices. Each logical rank's value is itself the same on any D in
deterministic mode, hence so is the reduction.
"""

from __future__ import annotations

import enum
from typing import Any, Sequence

import torch
import torch.distributed as dist


class MetricOp(enum.Enum):
    """How the W logical ranks' values of a metric become one value."""

    MEAN = "mean"
    SUM = "sum"
    MAX = "max"
    MIN = "min"

    @classmethod
    def of(cls, op: "MetricOp | str") -> "MetricOp":
        """:raises ValueError: ``op`` names no operation (the message lists them)."""
        if isinstance(op, cls):
            return op
        try:
            return cls(op)
        except ValueError:
            raise ValueError(f"op={op!r} is not one of "
                             f"{', '.join(repr(o.value) for o in cls)}") from None


def fold(values: Sequence[float], op: MetricOp) -> float:
    """Reduce values given in logical-rank order: a left fold in float64
    (``((v0 + v1) + v2) + ...``), divided by their count for MEAN."""
    if not values:
        raise ValueError("no values to reduce")
    if op is MetricOp.MAX:
        return max(values)
    if op is MetricOp.MIN:
        return min(values)
    total = 0.0
    for v in values:
        total += v
    return total / len(values) if op is MetricOp.MEAN else total


def as_float(name: str, value: Any) -> float:
    """A recorded value as a Python float (a tensor of one element, or a number).

    :raises ValueError: the value is not one number.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r}: a tensor of shape {tuple(value.shape)} is "
                             f"not one value; record a scalar (e.g. loss.detach())")
        return float(value.detach().reshape(()).item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"metric {name!r}: value {value!r} is not a number or a "
                         f"one-element tensor")
    return float(value)


class StepMetrics:
    """The values this device's logical ranks recorded in one step."""

    def __init__(self, ranks: range) -> None:
        self.ranks = ranks
        self.values: dict[str, dict[int, float]] = {}

    def record(self, name: str, rank: int, value: Any) -> None:
        """:raises ValueError: not a number, or recorded twice in the rank's turn."""
        by_rank = self.values.setdefault(name, {})
        if rank in by_rank:
            raise ValueError(f"metric {name!r} recorded twice by logical rank {rank} in "
                             f"one step")
        by_rank[rank] = as_float(name, value)

    def local(self, name: str) -> list[float]:
        """This device's values in logical-rank order.

        :raises ValueError: a logical rank did not record the metric.
        """
        by_rank = self.values.get(name, {})
        missing = [r for r in self.ranks if r not in by_rank]
        if missing:
            raise ValueError(f"metric {name!r} was not recorded by logical rank(s) "
                             f"{', '.join(map(str, missing))}; call step.record({name!r}, "
                             f"value) in every turn of step.batches()")
        return [by_rank[r] for r in self.ranks]


def all_ranks(local: list[float], *, devices: int, device: torch.device) -> list[float]:
    """Every logical rank's value in rank order (collective when D > 1:
    every device calls it with its own ranks' values)."""
    if devices == 1:
        return list(local)
    mine = torch.tensor(local, dtype=torch.float64, device=device)
    blocks = [torch.empty_like(mine) for _ in range(devices)]
    dist.all_gather(blocks, mine)
    return [v for block in blocks for v in block.tolist()]
