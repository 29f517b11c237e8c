"""Contract of the policy subsystem: the value types every other subsystem
reads (the planner, job_submit rendering, ``job explain``, the simulator).

All types are frozen dataclasses validated in ``__post_init__`` with
``PolicyError`` (a ``ValueError``); loading a file (``load.py``) adds the file
name, key and line to the error.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping


class PolicyError(ValueError):
    """A policy is invalid. ``key`` is the dotted key (``tiers.basic.grace_time_s``),
    ``path`` and ``line`` say where, when known."""

    def __init__(self, message: str, *, key: str | None = None,
                 path: str | None = None, line: int | None = None) -> None:
        self.message = message
        self.key = key
        self.path = path
        self.line = line
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = self.path + (f":{self.line}" if self.line is not None else "") + ": "
        key = f"{self.key}: " if self.key else ""
        return f"{where}{key}{self.message}"


class Tier(enum.Enum):
    """SLA class. Ordered: ``PREMIUM`` > ``STANDARD`` > ``BASIC``."""

    PREMIUM = "premium"
    STANDARD = "standard"
    BASIC = "basic"

    @property
    def rank(self) -> int:
        """Higher is more important (premium=2, standard=1, basic=0)."""
        return {Tier.PREMIUM: 2, Tier.STANDARD: 1, Tier.BASIC: 0}[self]

    @classmethod
    def parse(cls, text: str, key: str = "tier") -> "Tier":
        """:raises PolicyError: not one of premium, standard, basic."""
        try:
            return cls(text)
        except ValueError:
            names = ", ".join(t.value for t in cls)
            raise PolicyError(f"unknown tier {text!r} (expected one of {names})", key=key) from None


class PreemptMode(enum.Enum):
    """How Slurm preempts a job of this tier."""

    REQUEUE = "requeue"   # checkpoint in the grace time, then requeue
    CANCEL = "cancel"
    OFF = "off"           # never preempted


@dataclass(frozen=True)
class TierSpec:
    """What a tier promises and how it maps onto Slurm's preemption."""

    tier: Tier
    #: Slurm partition that jobs of this tier run in (partition_prio preemption).
    partition: str
    #: PriorityTier of that partition; a higher tier preempts a lower one.
    priority_tier: int
    #: How jobs of this tier are preempted by higher tiers.
    preempt_mode: PreemptMode
    #: Seconds between the preemption signal and SIGKILL (Slurm GraceTime), >= 0.
    grace_time_s: int
    #: Signal the job gets to checkpoint ("USR1", "TERM", ...).
    signal: str
    #: Promised GPU fraction (ideal / actual run time), 0..1.
    gpu_fraction: float
    #: Tiers that may preempt or shrink jobs of this tier.
    preemptible_by: tuple[Tier, ...] = ()

    def __post_init__(self) -> None:
        if self.grace_time_s < 0:
            raise PolicyError("must be >= 0", key=f"tiers.{self.tier.value}.grace_time_s")
        if not 0.0 <= self.gpu_fraction <= 1.0:
            raise PolicyError("must be between 0 and 1", key=f"tiers.{self.tier.value}.gpu_fraction")
        for other in self.preemptible_by:
            if other.rank <= self.tier.rank:
                raise PolicyError(
                    f"{other.value} cannot preempt {self.tier.value}: only a higher tier can",
                    key=f"tiers.{self.tier.value}.preemptible_by")


@dataclass(frozen=True)
class AccountSpec:
    """A Slurm account (team) and what it may use."""

    name: str
    #: Tiers the account may submit to.
    tiers: tuple[Tier, ...]
    #: Most GPUs the account may hold at once; None = no quota.
    gpu_quota: int | None = None
    #: Relative share of the cluster in fair sharing, > 0.
    fair_share_weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.tiers:
            raise PolicyError("needs at least one tier", key=f"accounts.{self.name}.tiers")
        if self.gpu_quota is not None and self.gpu_quota < 1:
            raise PolicyError("must be >= 1", key=f"accounts.{self.name}.gpu_quota")
        if self.fair_share_weight <= 0:
            raise PolicyError("must be > 0", key=f"accounts.{self.name}.fair_share_weight")


@dataclass(frozen=True)
class Defaults:
    """What a submission gets when it says nothing."""

    tier: Tier = Tier.STANDARD
    #: Account used for users without an account entry in the policy; None =
    #: such users are refused.
    account: str | None = "default"


@dataclass(frozen=True)
class ElasticRules:
    """Rules for ``--elastic`` and ``--world-size``."""

    #: World size must be a multiple of every device count in the elastic
    #: range that the job may run on (MIN and MAX at least).
    world_size_multiple_of_devices: bool = True
    #: Largest splice factor W / D allowed, >= 1.
    max_splice_factor: int = 16


@dataclass(frozen=True)
class Policy:
    """A whole, validated policy."""

    tiers: Mapping[Tier, TierSpec]
    accounts: Mapping[str, AccountSpec]
    defaults: Defaults = field(default_factory=Defaults)
    elastic: ElasticRules = field(default_factory=ElasticRules)

    def tier(self, t: Tier) -> TierSpec:
        return self.tiers[t]
