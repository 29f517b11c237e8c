"""Workload traces: readers for the Philly and Alibaba GPU traces, and the
seeded rule that gives trace jobs the tiers and elastic ranges they lack.

Readers fail closed: a missing column, a field that is not a number, or a
number outside its bounds (below) is a ``TraceError`` naming the file, line
and column; so is a byte that is not UTF-8 (with its byte offset). The bounds
keep the simulator tractable: an absurd value (``num_gpus=1e18``,
``duration=1e300``) is refused at once instead of running for ever. Every
reader returns ``TraceJob`` values in submission order with times in seconds
from the first submission.
"""

from __future__ import annotations

import csv
import hashlib
import math
import random
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

from ...policy.api import Tier
from ..api import SchedError
from .constants import ELASTIC_MAX_SPLICE

FORMATS = ("philly", "alibaba-v2023")
DEFAULT_TIER_RULE = "random:20/30/50"

#: Most GPUs a trace job may ask for and a simulated cluster may have (about
#: the largest GPU clusters built; Philly's largest job asks for 128).
MAX_GPUS = 100_000
#: Longest run time of one trace job, seconds (ten years; Philly's longest is 54 days).
MAX_DURATION_S = 10 * 365 * 86400.0
#: Longest span from the first to the last submission of a trace, seconds (ten years).
MAX_SPAN_S = 10 * 365 * 86400.0
#: Largest absolute time stamp of an Alibaba trace, seconds (about 3,000 years).
MAX_TIME_S = 1e11


class TraceError(SchedError):
    """A trace (or a tier rule) is malformed; the message says where."""


@dataclass(frozen=True, slots=True)
class TraceJob:
    """One job of a trace: when it came, how long it runs at full size, what it asks for."""

    job_id: int
    submit_s: float
    #: Run time in seconds at D == W devices.
    duration_s: float
    world_size: int
    account: str
    tier: Tier | None = None
    min_devices: int | None = None
    max_devices: int | None = None
    #: A long-running service (an Alibaba pod still running at the end of
    #: the trace): it holds its GPUs for its lifetime, rigid, and its
    #: lifetime is not a job completion time (the metrics leave it out).
    service: bool = False


# -- readers -----------------------------------------------------------------

class _Lines:
    """The lines of a binary file decoded as UTF-8, counted (``number`` is the
    last line read); a bad byte is a ``TraceError`` naming its line and byte offset."""

    def __init__(self, path: Path, raw) -> None:
        self.path, self.raw, self.number, self.offset = path, raw, 0, 0

    def __iter__(self) -> Iterator[str]:
        for data in self.raw:
            self.number += 1
            try:
                yield data.decode("utf-8-sig" if self.number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise TraceError(f"{self.path}:{self.number}: not UTF-8: byte "
                                 f"0x{data[exc.start]:02x} at byte offset "
                                 f"{self.offset + exc.start} of the file") from None
            self.offset += len(data)


def _rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror}") from None
    with f:
        lines = _Lines(path, f)
        reader = csv.DictReader(lines)
        try:
            missing = [c for c in required if c not in (reader.fieldnames or ())]
            if missing:
                raise TraceError(f"{path}:1: missing column(s) {', '.join(missing)} "
                                 f"(expected {', '.join(required)})")
            for row in reader:
                yield reader.line_num, row
        except csv.Error as exc:
            raise TraceError(f"{path}:{lines.number}: not CSV: {exc}") from None
        except OSError as exc:
            raise TraceError(f"{path}: cannot read: {exc.strerror}") from None


def _number(path: Path, line: int, row: dict[str, str], col: str, lo: float, hi: float, *,
            whole: bool = False, allow_empty: bool = False) -> float | None:
    """Column ``col`` of ``row`` as a finite number in [lo, hi] (a whole one if ``whole``).

    :raises TraceError: naming the file, line, column and the allowed range.
    """
    text = (row.get(col) or "").strip()
    if not text and allow_empty:
        return None
    kind = "a whole number" if whole else "a number"
    try:
        value = float(text)
    except ValueError:
        raise TraceError(f"{path}:{line}: column {col}: not a number: {text!r}") from None
    if not math.isfinite(value) or not lo <= value <= hi or (whole and value != int(value)):
        raise TraceError(f"{path}:{line}: column {col}: must be {kind} in [{lo:g}, {hi:g}], "
                         f"got {text!r}")
    return value


def read_philly(path: str | Path, notes: dict | None = None) -> list[TraceJob]:
    """Read the Philly CSV (``timestamp,duration,num_gpus,gpu_time,cluster``):
    ``duration`` in [0, MAX_DURATION_S], ``num_gpus`` whole in [1, MAX_GPUS],
    ``gpu_time`` (not used) in [0, MAX_DURATION_S * MAX_GPUS], submissions
    within MAX_SPAN_S of each other.

    :raises TraceError: naming the line and column of the first bad field.
    """
    path = Path(path)
    jobs: list[TraceJob] = []
    lines: list[int] = []
    for line, row in _rows(path, ("timestamp", "duration", "num_gpus", "gpu_time", "cluster")):
        try:
            when = datetime.fromisoformat(row["timestamp"].strip())
        except (ValueError, AttributeError):
            raise TraceError(f"{path}:{line}: column timestamp: not a date "
                             f"'YYYY-MM-DD HH:MM:SS': {row['timestamp']!r}") from None
        try:
            ts = when.timestamp()
        except (ValueError, OverflowError, OSError):
            raise TraceError(f"{path}:{line}: column timestamp: a date out of range: "
                             f"{row['timestamp']!r}") from None
        duration = _number(path, line, row, "duration", 0, MAX_DURATION_S)
        gpus = _number(path, line, row, "num_gpus", 1, MAX_GPUS, whole=True)
        _number(path, line, row, "gpu_time", 0, MAX_DURATION_S * MAX_GPUS)
        cluster = (row["cluster"] or "").strip()
        if not cluster:
            raise TraceError(f"{path}:{line}: column cluster: empty")
        jobs.append(TraceJob(len(jobs), ts, duration, int(gpus), cluster))
        lines.append(line)
    return _rebase(jobs, path, lines)


_ALIBABA_COLUMNS = ("name", "cpu_milli", "memory_mib", "num_gpu", "gpu_milli", "gpu_spec", "qos",
                    "pod_phase", "creation_time", "deletion_time", "scheduled_time")
#: Every ``qos`` the trace's schema documents (Kubernetes' classes and
#: Alibaba's LS/BE): Guaranteed (requests = limits, never evicted for want of
#: resources) and LS (latency sensitive) are premium, Burstable standard,
#: BE (best effort) basic.
_QOS_TIER = {"Guaranteed": Tier.PREMIUM, "LS": Tier.PREMIUM, "Burstable": Tier.STANDARD,
             "BE": Tier.BASIC}
#: Every ``pod_phase`` the schema documents.
_PHASES = ("Succeeded", "Failed", "Running", "Pending")


def read_alibaba(path: str | Path, notes: dict | None = None) -> list[TraceJob]:
    """Read the Alibaba cluster-trace-gpu-v2023 pod CSV.

    - ``qos``: Guaranteed and LS -> premium, Burstable -> standard, BE ->
      basic (``_QOS_TIER``); any other value is refused.
    - ``pod_phase``: Succeeded and Failed pods are jobs (a failed pod held
      its GPUs too); a Running pod is a *service*: it holds its GPUs from
      ``scheduled_time`` to ``deletion_time`` (or, without one, to the last
      time stamp of the trace), rigid, and the metrics do not count its
      lifetime as a completion time; Pending pods never ran and are dropped.
    - Dropped, and counted by reason in ``notes["dropped"]``: pods without
      GPUs (``num_gpu`` 0), never scheduled (Pending, or no
      ``scheduled_time``), and finished pods without a ``deletion_time``.
    - ``gpu_milli`` < 1000 (a share of one GPU): the simulated clusters have
      whole GPUs, so such a pod is **rounded up to one whole GPU**, counted
      in ``notes["rounded_up"]`` (with the GPUs it asked for in
      ``notes["rounded_up_gpu_milli"]``).

    The account is ``gpu_spec`` (``any`` when empty); the duration
    ``deletion_time - scheduled_time`` (at most MAX_DURATION_S). Times are in
    [-MAX_TIME_S, MAX_TIME_S], ``num_gpu`` whole in [0, MAX_GPUS],
    ``gpu_milli`` in [0, 1000], ``cpu_milli`` and ``memory_mib`` (not used)
    finite and >= 0.

    :raises TraceError: naming the line and column of the first bad field.
    """
    path = Path(path)
    notes = {} if notes is None else notes
    dropped: dict[str, int] = {}
    notes.update({"dropped": dropped, "rounded_up": 0, "rounded_up_gpu_milli": 0, "services": 0})
    jobs: list[TraceJob] = []
    lines: list[int] = []
    open_services: list[tuple[int, float]] = []     # (job index, scheduled_time)
    last_time = -MAX_TIME_S
    for line, row in _rows(path, _ALIBABA_COLUMNS):
        _number(path, line, row, "cpu_milli", 0, 1e9)
        _number(path, line, row, "memory_mib", 0, 1e12)
        gpus = _number(path, line, row, "num_gpu", 0, MAX_GPUS, whole=True)
        milli = _number(path, line, row, "gpu_milli", 0, 1000)
        created = _number(path, line, row, "creation_time", -MAX_TIME_S, MAX_TIME_S)
        scheduled = _number(path, line, row, "scheduled_time", -MAX_TIME_S, MAX_TIME_S,
                            allow_empty=True)
        deleted = _number(path, line, row, "deletion_time", -MAX_TIME_S, MAX_TIME_S,
                          allow_empty=True)
        last_time = max([last_time, created] + [t for t in (scheduled, deleted) if t is not None])
        qos = (row["qos"] or "").strip()
        if qos not in _QOS_TIER:
            raise TraceError(f"{path}:{line}: column qos: unknown {qos!r} "
                             f"(expected {', '.join(_QOS_TIER)})")
        phase = (row["pod_phase"] or "").strip()
        if phase not in _PHASES:
            raise TraceError(f"{path}:{line}: column pod_phase: unknown {phase!r} "
                             f"(expected {', '.join(_PHASES)})")
        service = phase == "Running"
        reason = ("no GPU (num_gpu 0)" if gpus == 0 else
                  "never scheduled (Pending or no scheduled_time)"
                  if phase == "Pending" or scheduled is None else
                  "finished without a deletion_time" if deleted is None and not service else None)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        if deleted is not None and deleted < scheduled:
            raise TraceError(f"{path}:{line}: negative duration: deletion_time {deleted:g} < "
                             f"scheduled_time {scheduled:g}")
        if deleted is not None and deleted - scheduled > MAX_DURATION_S:
            raise TraceError(f"{path}:{line}: duration deletion_time - scheduled_time "
                             f"{deleted - scheduled:g} s is over the bound {MAX_DURATION_S:g} s")
        if gpus == 1 and milli < 1000:
            notes["rounded_up"] += 1
            notes["rounded_up_gpu_milli"] += int(milli)
        account = (row["gpu_spec"] or "").strip() or "any"
        w = int(gpus)
        if service:
            notes["services"] += 1
            if deleted is None:
                open_services.append((len(jobs), scheduled))
        jobs.append(TraceJob(len(jobs), created, 0.0 if deleted is None else deleted - scheduled,
                             w, account, _QOS_TIER[qos],
                             min_devices=w if service else None,
                             max_devices=w if service else None, service=service))
        lines.append(line)
    for k, scheduled in open_services:      # runs to the end of the trace
        jobs[k] = replace(jobs[k], duration_s=min(MAX_DURATION_S, last_time - scheduled))
    return _rebase(jobs, path, lines)


def _rebase(jobs: list[TraceJob], path: Path, lines: list[int]) -> list[TraceJob]:
    """Jobs in submission order, times from the first submission.

    :raises TraceError: no jobs, or submissions spanning more than MAX_SPAN_S
        (naming the lines of the first and the last submission).
    """
    if not jobs:
        raise TraceError(f"{path}: no jobs in the trace")
    first = min(range(len(jobs)), key=lambda k: jobs[k].submit_s)
    last = max(range(len(jobs)), key=lambda k: jobs[k].submit_s)
    t0 = jobs[first].submit_s
    if jobs[last].submit_s - t0 > MAX_SPAN_S:
        raise TraceError(f"{path}:{lines[last]}: submitted {jobs[last].submit_s - t0:g} s after "
                         f"line {lines[first]}; a trace may span at most {MAX_SPAN_S:g} s")
    ordered = sorted(jobs, key=lambda j: (j.submit_s, j.job_id))
    return [replace(j, job_id=k, submit_s=j.submit_s - t0) for k, j in enumerate(ordered)]


READERS: dict[str, Callable[[str | Path, dict | None], list[TraceJob]]] = {
    "philly": read_philly, "alibaba-v2023": read_alibaba}


def read_trace(path: str | Path, fmt: str, notes: dict | None = None) -> list[TraceJob]:
    """The trace's jobs; ``notes`` (if given) gets what the reader dropped,
    rounded or took as services (``read_alibaba``).

    :raises TraceError: unknown format, unreadable or malformed trace."""
    reader = READERS.get(fmt)
    if reader is None:
        raise TraceError(f"unknown trace format {fmt!r} (expected one of {', '.join(FORMATS)})")
    return reader(path, notes)


# -- tier and elastic rule ---------------------------------------------------

def _shares(text: str, rule: str) -> tuple[float, float, float]:
    try:
        parts = [float(p) for p in text.split("/")]
    except ValueError:
        parts = []
    if len(parts) != 3 or not all(math.isfinite(p) and p >= 0 for p in parts) or sum(parts) <= 0:
        raise TraceError(f"--tiers {rule!r}: expected PREMIUM/STANDARD/BASIC percentages, e.g. 20/30/50")
    total = sum(parts)
    return parts[0] / total, parts[1] / total, parts[2] / total


def _pick(u: float, shares: tuple[float, float, float]) -> Tier:
    if u < shares[0]:
        return Tier.PREMIUM
    if u < shares[0] + shares[1]:
        return Tier.STANDARD
    return Tier.BASIC


def elastic_range(world_size: int) -> tuple[int, int]:
    """MIN:MAX for a job without one: MIN the smallest divisor with W/D <= ELASTIC_MAX_SPLICE.

    Looks at the divisors pairwise up to sqrt(W), so a large W costs little.
    """
    small = [d for d in range(1, math.isqrt(world_size) + 1) if world_size % d == 0]
    divisors = small + [world_size // d for d in small]
    lo = min(d for d in divisors if world_size // d <= ELASTIC_MAX_SPLICE)
    return lo, world_size


def describe_rule(rule: str) -> str:
    """One sentence saying what a tier rule does (printed in every report)."""
    kind, _, arg = rule.partition(":")
    elastic = (f"elastic range MIN:W with MIN the smallest divisor of W such that "
               f"W/MIN <= {ELASTIC_MAX_SPLICE}")
    if kind == "random":
        return f"each job's tier drawn with the seed, premium/standard/basic = {arg} %; {elastic}"
    if kind == "cluster":
        return (f"each account (virtual cluster) gets one tier from a seeded hash of its name, "
                f"premium/standard/basic = {arg} % of accounts; {elastic}")
    if kind == "size":
        return f"tier by GPUs asked: <= {arg.split('/')[0]} premium, <= {arg.split('/')[1]} standard, else basic; {elastic}"
    return f"tiers from the trace itself (Alibaba qos); {elastic}"


def assign_tiers(jobs: list[TraceJob], rule: str = DEFAULT_TIER_RULE, seed: int = 0) -> list[TraceJob]:
    """Give every job a tier and an elastic range by ``rule``:

    - ``random:P/S/B``: each job's tier drawn (seeded) with these percentages;
    - ``cluster:P/S/B``: each account's tier from a seeded hash of its name;
    - ``size:A/B``: jobs asking <= A GPUs premium, <= B standard, else basic;
    - ``trace``: keep the trace's own tiers (a job without one is standard).

    :raises TraceError: the rule is malformed.
    """
    kind, _, arg = rule.partition(":")
    rng = random.Random(seed)
    if kind in ("random", "cluster"):
        shares = _shares(arg, rule)
    elif kind == "size":
        try:
            small, mid = (int(x) for x in arg.split("/"))
        except ValueError:
            raise TraceError(f"--tiers {rule!r}: expected size:A/B, e.g. size:1/8") from None
    elif kind != "trace":
        raise TraceError(f"--tiers {rule!r}: unknown rule (expected random:P/S/B, "
                         f"cluster:P/S/B, size:A/B or trace)")
    out = []
    for j in jobs:
        if kind == "random":
            tier = _pick(rng.random(), shares)
        elif kind == "cluster":
            h = hashlib.sha256(f"{seed}:{j.account}".encode()).digest()
            tier = _pick(int.from_bytes(h[:8], "big") / 2 ** 64, shares)
        elif kind == "size":
            tier = (Tier.PREMIUM if j.world_size <= small else
                    Tier.STANDARD if j.world_size <= mid else Tier.BASIC)
        else:
            tier = j.tier or Tier.STANDARD
        lo, hi = (j.min_devices, j.max_devices) if j.min_devices else elastic_range(j.world_size)
        out.append(replace(j, tier=tier, min_devices=lo, max_devices=hi))
    return out
