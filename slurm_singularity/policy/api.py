"""Contract of the policy subsystem: the value types every other subsystem
reads (the planner, job_submit rendering, ``job explain``, the simulator).

All types are frozen dataclasses validated in ``__post_init__`` with
``PolicyError`` (a ``ValueError``); loading a file (``load.py``) adds the file
name, key and line to the error.
"""

from __future__ import annotations

import enum
import hashlib
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Mapping


#: Partition and account names: what Slurm accepts and a Lua string needs no escaping for.
_SLURM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Login names of account members (useradd's default rule; "root" included).
_USER_NAME = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")


#: Bounds of the policy's numbers (inclusive). Each keeps a value meaningful
#: to Slurm and to the planner; a value outside, NaN, an infinity or a
#: subnormal (a typo such as ``1e-320``) is a ``PolicyError`` naming the key
#: and the range.
PRIORITY_TIER_MAX = 65533          # Slurm's PriorityTier is a uint16 with two values reserved
GRACE_TIME_S_MAX = 86400           # one day between the preemption signal and SIGKILL
GPU_QUOTA_MAX = 1_000_000          # far above any cluster's GPUs
FAIR_SHARE_WEIGHT_RANGE = (1e-6, 1e6)
MAX_SPLICE_FACTOR_MAX = 1024       # logical ranks time-sliced on one device


class PolicyError(ValueError):
    """Root of the policy's errors: a policy (or a submission's options,
    ``SbatchArgsError``) is invalid. ``key`` is the dotted key (``tiers.basic.grace_time_s``),
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


def check_bounds(value: int | float, key: str, lo: float, hi: float, *,
                 whole: bool = False) -> None:
    """Refuse a policy number outside [lo, hi], not finite, or subnormal.

    :raises PolicyError: naming ``key`` and the allowed range.
    """
    def show(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"
    kind = "a whole number" if whole else "a number"
    bad = (isinstance(value, bool) or not isinstance(value, (int, float))
           or (whole and not isinstance(value, int)))
    if not bad:
        bad = (not math.isfinite(value) or not lo <= value <= hi
               or (value != 0 and abs(value) < sys.float_info.min))
    if bad:
        raise PolicyError(f"must be {kind} in [{show(lo)}, {show(hi)}], got {value!r}", key=key)


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
    #: PriorityTier of that partition, 0 to 65533; a higher tier preempts a lower one.
    priority_tier: int
    #: How jobs of this tier are preempted by higher tiers.
    preempt_mode: PreemptMode
    #: Seconds between the preemption signal and SIGKILL (Slurm GraceTime), 0 to 86400.
    grace_time_s: int
    #: Signal the job gets to checkpoint ("USR1", "TERM", ...).
    signal: str
    #: Promised GPU fraction (ideal / actual run time), 0..1.
    gpu_fraction: float
    #: Tiers that may preempt or shrink jobs of this tier.
    preemptible_by: tuple[Tier, ...] = ()

    def __post_init__(self) -> None:
        key = f"tiers.{self.tier.value}"
        check_bounds(self.grace_time_s, f"{key}.grace_time_s", 0, GRACE_TIME_S_MAX, whole=True)
        check_bounds(self.gpu_fraction, f"{key}.gpu_fraction", 0, 1)
        check_bounds(self.priority_tier, f"{key}.priority_tier", 0, PRIORITY_TIER_MAX, whole=True)
        if not _SLURM_NAME.fullmatch(self.partition):
            raise PolicyError("partition names are letters, digits, '-' and '_'",
                              key=f"tiers.{self.tier.value}.partition")
        name = self.signal.upper().removeprefix("SIG")
        if name not in _SIGNALS:
            raise PolicyError(f"unknown signal {self.signal!r} (e.g. TERM, USR1, USR2, INT)",
                              key=f"tiers.{self.tier.value}.signal")
        object.__setattr__(self, "signal", name)
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
    #: Most GPUs the account may hold at once, 1 to 1,000,000; None = no quota.
    gpu_quota: int | None = None
    #: Relative share of the cluster in fair sharing, 1e-6 to 1e6.
    fair_share_weight: float = 1.0
    #: Login names of the users who may charge jobs to the account. Empty:
    #: membership is Slurm's associations alone (the local cluster gives
    #: root and the user who runs it one in every such account). Non-empty:
    #: job_submit.lua also refuses any other user, and ``policy apply`` and
    #: the local cluster make exactly these associations. A member's default
    #: account is the first account of the policy that lists them.
    members: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _SLURM_NAME.fullmatch(self.name) or self.name != self.name.lower():
            raise PolicyError("account names are lower-case letters, digits, '-' and '_' "
                              "(Slurm lower-cases --account)", key=f"accounts.{self.name}")
        for user in self.members:
            if not isinstance(user, str) or not _USER_NAME.fullmatch(user):
                raise PolicyError(f"{user!r} is not a login name (lower-case letters, digits, "
                                  "'_', '.', '-'; at most 32)", key=f"accounts.{self.name}.members")
        if len(set(self.members)) != len(self.members):
            raise PolicyError("lists a user twice", key=f"accounts.{self.name}.members")
        if not self.tiers:
            raise PolicyError("needs at least one tier", key=f"accounts.{self.name}.tiers")
        if self.gpu_quota is not None:
            check_bounds(self.gpu_quota, f"accounts.{self.name}.gpu_quota", 1, GPU_QUOTA_MAX,
                         whole=True)
        check_bounds(self.fair_share_weight, f"accounts.{self.name}.fair_share_weight",
                     *FAIR_SHARE_WEIGHT_RANGE)


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
    #: Largest splice factor W / D allowed, 1 to 1024.
    max_splice_factor: int = 16
    #: Who preempts and shrinks jobs for higher tiers: "slurm" (Slurm's own
    #: partition-priority preemption, which works without the scheduler
    #: daemon but races it: Slurm preempts a whole job before the daemon can
    #: shrink it) or "daemon" (Slurm's preemption is off and
    #: singularity-schedd takes every such decision, as the simulator does).
    preemption: str = "slurm"

    def __post_init__(self) -> None:
        check_bounds(self.max_splice_factor, "elastic.max_splice_factor", 1,
                     MAX_SPLICE_FACTOR_MAX, whole=True)
        if self.preemption not in ("slurm", "daemon"):
            raise PolicyError(f"must be \"slurm\" or \"daemon\", not {self.preemption!r}",
                              key="elastic.preemption")


#: Signal names a tier may use for its preemption signal.
_SIGNALS = frozenset({"TERM", "INT", "HUP", "USR1", "USR2", "QUIT", "ALRM", "CONT", "URG"})


@dataclass(frozen=True)
class PartitionSpec:
    """A Slurm partition that the policy declares (``[partitions.NAME]``).

    A tier may only name a partition declared here: "the partition exists"
    means "the policy declares it", because the policy's own slurm.conf
    fragment (``policy.conf``) is what creates the partitions.
    """

    name: str
    #: Slurm node list (``n[1-4]``) or ``ALL``: every node of the cluster (the
    #: node list handed to ``render_policy_files``).
    nodes: str = "ALL"
    #: Slurm MaxTime of the partition (``UNLIMITED``, ``60``, ``1-00:00:00``).
    max_time: str = "UNLIMITED"

    def __post_init__(self) -> None:
        if not _SLURM_NAME.fullmatch(self.name):
            raise PolicyError("partition names are letters, digits, '-' and '_'",
                              key=f"partitions.{self.name}")
        if not self.nodes or any(c.isspace() for c in self.nodes):
            raise PolicyError("must be a Slurm node list or ALL",
                              key=f"partitions.{self.name}.nodes")
        if not self.max_time or any(c.isspace() for c in self.max_time):
            raise PolicyError("must be a Slurm time or UNLIMITED",
                              key=f"partitions.{self.name}.max_time")


@dataclass(frozen=True)
class Policy:
    """A whole, validated policy.

    Cross-checks (each raises ``PolicyError`` naming the key): every tier's
    partition is declared in ``partitions`` and used by one tier only; the
    default tier and every account's tiers exist; the default account exists
    (or is None); ``priority_tier`` never decreases from basic to premium;
    ``preemptible_by`` is exactly the tiers whose partition has a higher
    ``priority_tier`` (that is all ``preempt/partition_prio`` can express),
    and a tier preemptible by someone has a preempt mode other than ``off``.
    """

    tiers: Mapping[Tier, TierSpec]
    accounts: Mapping[str, AccountSpec]
    defaults: Defaults = field(default_factory=Defaults)
    elastic: ElasticRules = field(default_factory=ElasticRules)
    #: Partitions the policy creates, by name. Empty: one partition per tier,
    #: named as the tier's ``partition``, over all nodes.
    partitions: Mapping[str, PartitionSpec] = field(default_factory=dict)
    #: The TOML text the policy was parsed from ("" for one built in code).
    #: ``policy apply`` installs it beside the files it renders, and its
    #: sha256 goes into them, so that every reader can check it decides on
    #: the policy Slurm enforces. Not part of equality.
    source_text: str = field(default="", compare=False, repr=False)

    @property
    def sha256(self) -> str | None:
        """sha256 (hex) of ``source_text``; None for a policy built in code."""
        if not self.source_text:
            return None
        return hashlib.sha256(self.source_text.encode("utf-8")).hexdigest()

    def __post_init__(self) -> None:
        if not self.tiers:
            raise PolicyError("needs at least one tier", key="tiers")
        if not self.partitions:
            object.__setattr__(self, "partitions", {
                spec.partition: PartitionSpec(spec.partition) for spec in self.tiers.values()})
        used: dict[str, Tier] = {}
        for t, spec in self.tiers.items():
            key = f"tiers.{t.value}.partition"
            if spec.partition not in self.partitions:
                declared = ", ".join(sorted(self.partitions)) or "none"
                raise PolicyError(f"partition {spec.partition!r} is not declared in "
                                  f"[partitions] (declared: {declared})", key=key)
            if spec.partition in used:
                raise PolicyError(f"partition {spec.partition!r} is already the partition of "
                                  f"tier {used[spec.partition].value}; each tier needs its own",
                                  key=key)
            used[spec.partition] = t
        for name in self.partitions:
            if name not in used:
                raise PolicyError("is declared but no tier uses it; remove it or give it "
                                  "a tier", key=f"partitions.{name}")
        if self.defaults.tier not in self.tiers:
            raise PolicyError(f"tier {self.defaults.tier.value!r} is not defined in [tiers]",
                              key="defaults.tier")
        for name, acc in self.accounts.items():
            for t in acc.tiers:
                if t not in self.tiers:
                    raise PolicyError(f"tier {t.value!r} is not defined in [tiers]",
                                      key=f"accounts.{name}.tiers")
        if self.defaults.account is not None and self.defaults.account not in self.accounts:
            raise PolicyError(f"account {self.defaults.account!r} is not defined in [accounts]",
                              key="defaults.account")
        self._check_preemption()

    def _check_preemption(self) -> None:
        ordered = sorted(self.tiers.values(), key=lambda s: s.tier.rank)
        for low, high in zip(ordered, ordered[1:]):
            if high.priority_tier < low.priority_tier:
                raise PolicyError(
                    f"{high.priority_tier} is below the {low.tier.value} tier's "
                    f"{low.priority_tier}; a higher tier needs a priority_tier at least as high",
                    key=f"tiers.{high.tier.value}.priority_tier")
        for spec in ordered:
            key = f"tiers.{spec.tier.value}.preemptible_by"
            expected = {o.tier for o in ordered if o.priority_tier > spec.priority_tier}
            given = set(spec.preemptible_by)
            if given and given != expected:
                names = ", ".join(sorted(t.value for t in expected)) or "none"
                raise PolicyError(
                    "with partition priority preemption a tier is preemptible by every tier "
                    f"with a higher priority_tier or by none; here that is: {names}", key=key)
            if given and spec.preempt_mode is PreemptMode.OFF:
                raise PolicyError("a tier with preemptible_by needs preempt_mode requeue or "
                                  "cancel, not off",
                                  key=f"tiers.{spec.tier.value}.preempt_mode")

    def tier(self, t: Tier) -> TierSpec:
        return self.tiers[t]

    def preemptible(self, t: Tier) -> bool:
        """Whether jobs of tier ``t`` can be preempted by higher tiers."""
        return bool(self.tiers[t].preemptible_by)

    def tier_of_partition(self, partition: str) -> Tier | None:
        for t, spec in self.tiers.items():
            if spec.partition == partition:
                return t
        return None
