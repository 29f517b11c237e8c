"""A reference policy built in code: the tier promises of DESIGN.md.

The simulator and the planner's benchmark use it when no policy file is
given, and tests build variants of it; ``policy.load.load_policy`` reads the
same model from a TOML file.
"""

from __future__ import annotations

from typing import Mapping

from ...policy.api import AccountSpec, Defaults, Policy, PreemptMode, Tier, TierSpec

ALL_TIERS = (Tier.PREMIUM, Tier.STANDARD, Tier.BASIC)


def reference_policy(weights: Mapping[str, float] | None = None,
                     quotas: Mapping[str, int] | None = None, *,
                     standard_preemptible: bool = True,
                     premium_fraction: float = 0.95, standard_fraction: float = 0.70,
                     basic_fraction: float = 0.0) -> Policy:
    """Premium >= 95% never preempted; standard >= 70% preemptible by premium
    (unless ``standard_preemptible`` is False); basic preemptible by both."""
    tiers = {
        Tier.PREMIUM: TierSpec(Tier.PREMIUM, "premium", 30, PreemptMode.OFF, 0, "USR1",
                               premium_fraction, ()),
        Tier.STANDARD: TierSpec(Tier.STANDARD, "standard", 20, PreemptMode.REQUEUE, 60, "USR1",
                                standard_fraction,
                                (Tier.PREMIUM,) if standard_preemptible else ()),
        Tier.BASIC: TierSpec(Tier.BASIC, "basic", 10, PreemptMode.REQUEUE, 60, "USR1",
                             basic_fraction, (Tier.PREMIUM, Tier.STANDARD)),
    }
    quotas = quotas or {}
    names = sorted(set(weights or {}) | set(quotas) | {"default"})
    accounts = {a: AccountSpec(a, ALL_TIERS, quotas.get(a), (weights or {}).get(a, 1.0))
                for a in names}
    return Policy(tiers=tiers, accounts=accounts, defaults=Defaults(Tier.STANDARD, "default"))
