"""Read a policy file (TOML) into a validated ``Policy``, failing closed.

Why a hand-written schema rather than "whatever TOML gives": a policy decides
who may preempt whom, so a misspelt key (``grace_time = 60`` for
``grace_time_s``) must be an error, never a silently ignored line. Every
error is a ``PolicyError`` carrying the file, the dotted key and the line,
so ``singularity-admin policy check`` can print ``policy.toml:17:
tiers.basic.grace_time_s: must be a whole number in [0, 86400], got -1``.
Every number has bounds (``api.check_bounds``): NaN, an infinity or a
subnormal never reaches the planner or slurm.conf.

The file's layout (every key is documented in templates/policy.toml and
docs/admin-guide.md)::

    [defaults]          tier, account
    [elastic]           world_size_multiple_of_devices, max_splice_factor, preemption
    [partitions.NAME]   nodes, max_time
    [tiers.TIER]        partition, priority_tier, preempt_mode, grace_time_s,
                        signal, gpu_fraction, preemptible_by
    [accounts.NAME]     tiers, gpu_quota, fair_share_weight, members
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from .api import (FAIR_SHARE_WEIGHT_RANGE, GPU_QUOTA_MAX, GRACE_TIME_S_MAX,
                  MAX_SPLICE_FACTOR_MAX, PRIORITY_TIER_MAX, AccountSpec, Defaults, ElasticRules,
                  PartitionSpec, Policy, PolicyError, PreemptMode, Tier, TierSpec, check_bounds)

_TOP = ("defaults", "elastic", "partitions", "tiers", "accounts")


def load_policy(path: str | Path) -> Policy:
    """Read and validate the policy file at ``path``.

    :raises PolicyError: unreadable file, bad TOML or an invalid policy; the
        error names the file, the dotted key and the line.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"cannot read: {exc.strerror or exc}", path=str(p)) from None
    except UnicodeDecodeError:
        raise PolicyError("is not UTF-8 text", path=str(p)) from None
    return parse_policy(text, str(p))


def parse_policy(text: str, path: str = "<string>") -> Policy:
    """Parse and validate policy TOML ``text``; ``path`` is used in errors.

    :raises PolicyError: as ``load_policy``.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+)", str(exc))
        raise PolicyError(f"not valid TOML: {exc}", path=path,
                          line=int(m.group(1)) if m else None) from None
    try:
        return replace(_build(data), source_text=text)
    except PolicyError as exc:
        raise PolicyError(exc.message, key=exc.key, path=path,
                          line=line_of(text, exc.key) if exc.key else None) from None


# -- schema ------------------------------------------------------------------

def _typed(kind: type | tuple[type, ...], label: str) -> Callable[[Any, str], Any]:
    def check(value: Any, key: str) -> Any:
        # bool is an int in Python; a policy number is never true/false.
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise PolicyError(f"must be {label}, not {value!r}", key=key)
        if not isinstance(value, kind):
            raise PolicyError(f"must be {label}, not {type(value).__name__} {value!r}", key=key)
        return value
    return check


def _bounded(lo: float, hi: float, *, whole: bool = False) -> Callable[[Any, str], Any]:
    """A number in [lo, hi] (finite, not subnormal); the error names the range."""
    def check(value: Any, key: str) -> Any:
        check_bounds(value, key, lo, hi, whole=whole)
        return value
    return check


_STR = _typed(str, "a string")
_BOOL = _typed(bool, "true or false")


def _tier_value(value: Any, key: str) -> Tier:
    return Tier.parse(_STR(value, key), key=key)


def _tier_list(value: Any, key: str) -> tuple[Tier, ...]:
    if not isinstance(value, list):
        raise PolicyError(f"must be a list of tiers, not {type(value).__name__}", key=key)
    tiers = tuple(_tier_value(v, key) for v in value)
    if len(set(tiers)) != len(tiers):
        raise PolicyError("lists a tier twice", key=key)
    return tiers


def _preempt_mode(value: Any, key: str) -> PreemptMode:
    text = _STR(value, key)
    try:
        return PreemptMode(text.lower())
    except ValueError:
        names = ", ".join(m.value for m in PreemptMode)
        raise PolicyError(f"unknown preempt mode {text!r} (expected one of {names})",
                          key=key) from None


def _string_list(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise PolicyError(f"must be a list of login names, not {type(value).__name__}", key=key)
    return tuple(_STR(v, key) for v in value)


def _optional_account(value: Any, key: str) -> str | None:
    text = _STR(value, key)
    return text or None


_SCHEMA: dict[str, dict[str, Callable[[Any, str], Any]]] = {
    "defaults": {"tier": _tier_value, "account": _optional_account},
    "elastic": {"world_size_multiple_of_devices": _BOOL,
                "max_splice_factor": _bounded(1, MAX_SPLICE_FACTOR_MAX, whole=True),
                "preemption": _STR},
    "partitions": {"nodes": _STR, "max_time": _STR},
    "tiers": {"partition": _STR, "priority_tier": _bounded(0, PRIORITY_TIER_MAX, whole=True),
              "preempt_mode": _preempt_mode,
              "grace_time_s": _bounded(0, GRACE_TIME_S_MAX, whole=True), "signal": _STR,
              "gpu_fraction": _bounded(0, 1),
              "preemptible_by": _tier_list},
    "accounts": {"tiers": _tier_list, "gpu_quota": _bounded(1, GPU_QUOTA_MAX, whole=True),
                 "fair_share_weight": _bounded(*FAIR_SHARE_WEIGHT_RANGE),
                 "members": _string_list},
}
_REQUIRED = {
    "tiers": ("partition", "priority_tier", "preempt_mode", "grace_time_s", "signal",
              "gpu_fraction"),
    "accounts": ("tiers",),
}


def _table(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PolicyError(f"must be a table ([{key}]), not {type(value).__name__}", key=key)
    return value


def _fields(section: str, raw: Any, key: str) -> dict[str, Any]:
    """Check one table against the schema of ``section``: unknown keys and
    wrong types are errors, required keys must be present."""
    table = _table(raw, key)
    schema = _SCHEMA[section]
    out: dict[str, Any] = {}
    for name, value in table.items():
        if name not in schema:
            allowed = ", ".join(schema)
            raise PolicyError(f"unknown key (allowed here: {allowed})", key=f"{key}.{name}")
        out[name] = schema[name](value, f"{key}.{name}")
    for name in _REQUIRED.get(section, ()):
        if name not in out:
            raise PolicyError(f"missing required key {name!r}", key=key)
    return out


def _build(data: dict[str, Any]) -> Policy:
    for name in data:
        if name not in _TOP:
            raise PolicyError(f"unknown section (allowed: {', '.join(_TOP)})", key=name)
    if "tiers" not in data:
        raise PolicyError("missing section [tiers]", key="tiers")
    defaults = Defaults(**_fields("defaults", data.get("defaults", {}), "defaults"))
    elastic = ElasticRules(**_fields("elastic", data.get("elastic", {}), "elastic"))
    partitions = {
        name: PartitionSpec(name, **_fields("partitions", raw, f"partitions.{name}"))
        for name, raw in _table(data.get("partitions", {}), "partitions").items()}
    tiers: dict[Tier, TierSpec] = {}
    for name, raw in _table(data["tiers"], "tiers").items():
        tier = Tier.parse(name, key=f"tiers.{name}")
        tiers[tier] = TierSpec(tier=tier, **_fields("tiers", raw, f"tiers.{name}"))
    accounts = {
        name: AccountSpec(name, **_fields("accounts", raw, f"accounts.{name}"))
        for name, raw in _table(data.get("accounts", {}), "accounts").items()}
    return Policy(tiers=tiers, accounts=accounts, defaults=defaults, elastic=elastic,
                  partitions=partitions)


# -- where is a key ----------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_ASSIGN = re.compile(r"^\s*([A-Za-z0-9_.\"' -]+?)\s*=")


def _norm(key: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in key.split("."))


def line_of(text: str, dotted: str | None) -> int | None:
    """1-based line where ``dotted`` (``tiers.basic.grace_time_s``) is set in
    ``text``: the ``key = ...`` line inside its table, else the table's
    header, else the nearest enclosing table's header. None if not found."""
    if not dotted:
        return None
    target = dotted.split(".")
    best: tuple[int, int] | None = None    # (matched parts, line)
    table: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            table = _norm(header.group(1)).split(".")
            full = table
        else:
            assign = _ASSIGN.match(line)
            if not assign:
                continue
            full = table + _norm(assign.group(1)).split(".")
        matched = 0
        for a, b in zip(full, target):
            if a != b:
                break
            matched += 1
        if matched == len(full) and (best is None or matched > best[0]):
            best = (matched, number)
            if matched == len(target):
                break
    return best[1] if best else None
