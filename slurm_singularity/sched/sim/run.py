"""One simulation run, end to end: read, assign tiers, simulate, write DIR.

DIR is written all at once: everything goes to a temporary sibling folder
that is renamed onto DIR at the end, so an error leaves DIR as it was.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ...policy.api import Policy
from ..api import SchedError
from . import constants
from .engine import Engine
from .metrics import summarize
from .report import ROWS, write_plots, write_report
from .schedulers import check_scheduler, make_scheduler
from .trace import (DEFAULT_TIER_RULE, MAX_GPUS, TraceError, TraceJob, assign_tiers, describe_rule,
                    read_trace)

log = logging.getLogger(__name__)


#: Most GPUs per simulated node (the largest nodes built have 8 to 16; 72 in
#: one NVLink domain).
MAX_GPUS_PER_NODE = 128


class SimError(SchedError):
    """A simulation cannot run as asked (bad option, bad --compare folder)."""


@dataclass(frozen=True)
class SimSpec:
    """What to simulate. Validated in ``__post_init__`` (``SimError`` naming the option)."""

    trace: Path
    scheduler: str
    gpus: int
    policy: Policy
    policy_path: str = "(built in)"
    fmt: str = "philly"
    gpus_per_node: int = 8
    tier_rule: str | None = None
    seed: int = 0
    compare: tuple[Path, ...] = field(default_factory=tuple)
    #: The planner's fast path (default True): what one demand's search for
    #: GPUs found is reused for the next while no size changed. False: the
    #: plain path, the same decisions more slowly (to check that they are).
    incremental: bool = True

    def __post_init__(self) -> None:
        try:
            check_scheduler(self.scheduler)
        except ValueError as exc:
            raise SimError(str(exc)) from None
        for option, value, hi in (("--gpus", self.gpus, MAX_GPUS),
                                  ("--gpus-per-node", self.gpus_per_node, MAX_GPUS_PER_NODE)):
            if not isinstance(value, int) or not 1 <= value <= hi:
                raise SimError(f"{option}: must be a whole number in [1, {hi}], got {value!r}")
        if not isinstance(self.incremental, bool):
            raise SimError(f"incremental: must be true or false, got {self.incremental!r}")
        for d in self.compare:
            read_summary(d)

    @property
    def rule(self) -> str:
        if self.tier_rule:
            return self.tier_rule
        return "trace" if self.fmt == "alibaba-v2023" else DEFAULT_TIER_RULE


#: What report.md reads from a --compare run's summary.json, by type.
_COMPARED = {"scheduler": str, "trace": str, "gpus": int, "tier_rule": str, "seed": int,
             "sla_attainment": dict, "jct_by_tier": dict}


def read_summary(out: Path) -> dict[str, Any]:
    """The summary.json of an earlier output folder, checked enough for report.md.

    :raises SimError: naming the folder and what is wrong.
    """
    path = out / "summary.json"
    if not path.is_file():
        raise SimError(f"--compare: {out} has no summary.json (not a simulation output)")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SimError(f"--compare: {path}: not a readable summary: {exc}") from None
    if not isinstance(summary, dict):
        raise SimError(f"--compare: {path}: not a summary (a JSON object)")
    for key, kind in _COMPARED.items():
        if not isinstance(summary.get(key), kind) or isinstance(summary.get(key), bool):
            raise SimError(f"--compare: {path}: {key}: missing or not a {kind.__name__}")
    for key, _, fmt in ROWS:
        value = summary.get(key)
        number = isinstance(value, int if "d}" in fmt else (int, float))
        if value is not None and (isinstance(value, bool) or not number):
            raise SimError(f"--compare: {path}: {key}: not a number: {value!r}")
    for key in ("sla_attainment", "jct_by_tier"):
        for tier, value in summary[key].items():
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, (int, float))):
                raise SimError(f"--compare: {path}: {key}.{tier}: not a number: {value!r}")
    return summary


def load_jobs(spec: SimSpec, notes: dict | None = None) -> list[TraceJob]:
    """The trace's jobs with their tiers; ``notes`` gets the reader's notes
    (pods dropped and why, fractional GPUs rounded, services).

    :raises TraceError: as ``read_trace`` and ``assign_tiers``."""
    jobs = assign_tiers(read_trace(spec.trace, spec.fmt, notes), spec.rule, spec.seed)
    too_big = [j for j in jobs if j.min_devices > spec.gpus]
    if too_big:
        j = too_big[0]
        raise TraceError(f"{spec.trace}: job {j.job_id} needs at least {j.min_devices} GPUs but "
                         f"--gpus is {spec.gpus} ({len(too_big)} such jobs)")
    return jobs


def simulate(spec: SimSpec, *, jobs: list[TraceJob] | None = None,
             progress: Callable[[int], None] | None = None,
             record: Callable | None = None,
             notes: dict | None = None) -> tuple[Engine, dict[str, Any]]:
    """Run the simulation (on ``jobs`` if already loaded by ``load_jobs``,
    with the ``notes`` it filled); return the engine (for plots) and the summary.

    :raises TraceError: the trace or the tier rule is malformed.
    """
    started = time.perf_counter()
    if jobs is None:
        notes = {}
        jobs = load_jobs(spec, notes)
    scheduler = make_scheduler(spec.scheduler, spec.policy, spec.gpus, spec.gpus_per_node, record,
                               incremental=spec.incremental)
    engine = Engine(jobs, spec.gpus, scheduler, progress, seed=spec.seed)
    engine.run()
    summary = {
        "scheduler": spec.scheduler,
        "trace": str(spec.trace),
        "format": spec.fmt,
        "gpus": spec.gpus,
        "gpus_per_node": spec.gpus_per_node,
        "tier_rule": spec.rule,
        "tier_rule_text": describe_rule(spec.rule),
        "seed": spec.seed,
        "policy": spec.policy_path,
        "constants": constants_used(engine),
        "trace_notes": notes or {},
        **summarize(engine, spec.policy),
    }
    summary["wall_s"] = time.perf_counter() - started
    return engine, summary


def constants_used(engine: Engine) -> dict[str, Any]:
    """The job model's constants and the costs this run charged (summary.json)."""
    out = {k: getattr(constants, k) for k in dir(constants)
           if k.isupper() and isinstance(getattr(constants, k), (int, float, tuple))}
    costs = engine.costs
    out["costs"] = {"period_s": costs.period_s, "settle_s": costs.settle_s,
                    "handover_s": costs.handover_s, "restart_s": costs.restart_s,
                    "state_bytes": costs.state_bytes, "checkpoint_s": costs.checkpoint_s,
                    "restore_s": costs.restore_s, "scaling": costs.scaling.value}
    return out


def write_outputs(out: Path, engine: Engine, summary: dict[str, Any], compare: tuple[Path, ...]) -> None:
    """Write summary.json, the plots and report.md into ``out`` atomically."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)                  # mkdtemp makes it private
    try:
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        write_plots(tmp, engine, summary)
        others = [read_summary(d) for d in compare]
        write_report(tmp / "report.md", [summary] + others)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.rename(out, old / "x")
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
