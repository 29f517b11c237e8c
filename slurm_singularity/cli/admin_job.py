"""``singularity-admin job show JOBID``: a job's history, run by run.

Joins two sources: Slurm's accounting (``sacct``: each run's start, end,
nodes, GPUs and how Slurm ended it) and the runtime's ``history.jsonl`` in
the job's checkpoint directory (steps done, why it stopped, whether a
checkpoint was written, steps lost). Either may be missing (a plain script
has no history; a site without slurmdbd has no sacct): what is known is
shown and the rest is said to be unknown.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from .admin_policy import job_group


def register(sub: argparse._SubParsersAction) -> None:
    p = job_group(sub).add_parser("show", help="a job's runs: preemptions, resizes, lost work")
    p.add_argument("job_id", type=int, metavar="JOBID")
    p.add_argument("--ckpt-dir", type=Path, default=None,
                   help="the job's checkpoint directory (default: its --ckpt-dir if the "
                        "submit directory's .singularity/ckpt/job-JOBID)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_show)


@dataclass
class RunRow:
    run: int
    start: str
    end: str
    devices: int | None
    steps: str                 # "0..33" or "?"
    stopped: str               # preempted / resized / failed / finished / running / unknown
    checkpoint: str            # yes / no / ?
    steps_lost: int | None
    time_lost_s: float | None  # seconds spent on steps that will be recomputed
    slurm_state: str


def _epoch(iso: str) -> float | None:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def _pair(runs, history) -> list[tuple[object | None, object | None]]:
    """Pair sacct's runs with history records by time: a record belongs to
    the run during which it started. A run killed outright (SIGKILL after the
    grace time) has no record; a record without accounting stands alone."""
    pairs: list[tuple[object | None, object | None]] = []
    left = list(history)
    for run in runs:
        start = _epoch(run.start)
        end = _epoch(run.end) if run.end not in ("Unknown", "None", "") else float("inf")
        rec = None
        if start is not None and left and start - 2 <= left[0].start_time <= (end or 0) + 2:
            rec = left.pop(0)
        pairs.append((run, rec))
    pairs.extend((None, rec) for rec in left)
    return pairs


def build_rows(runs, history) -> list[RunRow]:
    """One row per run, oldest first, from sacct's runs and the runtime's
    history records (see ``_pair``)."""
    pairs = _pair(runs, history)
    rows = []
    for i, (run, rec) in enumerate(pairs):
        nxt = next((r for _, r in pairs[i + 1:] if r is not None), None)
        devices = rec.devices if rec else (run.gpus if run else None)
        lost_s = None
        if rec is not None:
            stopped = rec.stop.value
            if stopped == "preempted" and nxt is not None and nxt.devices != rec.devices:
                stopped = "resized"
            steps = f"{rec.first_step}..{rec.last_step}"
            ckpt = "yes" if rec.checkpoint_written else "no"
            lost = rec.steps_lost
            if rec.last_step > rec.first_step:
                per_step = (rec.end_time - rec.start_time) / (rec.last_step - rec.first_step)
                lost_s = round(rec.steps_lost * per_step, 1)
        else:
            state = run.state if run else "?"
            ckpt, lost = "?", None
            steps = f"{nxt.first_step}..?" if nxt is not None else "?"
            if state in ("REQUEUED", "PREEMPTED", "NODE_FAIL", "CANCELLED", "FAILED") and nxt:
                # killed before it could record anything: all its work is lost
                stopped, ckpt = "killed", "no"
                lost_s = float(run.elapsed_s)
            else:
                stopped = {"COMPLETED": "finished", "RUNNING": "running",
                           "REQUEUED": "preempted"}.get(state, state.lower())
        rows.append(RunRow(
            run=i + 1, start=run.start if run else "?", end=run.end if run else "?",
            devices=devices, steps=steps, stopped=stopped, checkpoint=ckpt,
            steps_lost=lost, time_lost_s=lost_s, slurm_state=run.state if run else "?"))
    return rows


def _show(args: argparse.Namespace) -> int:
    from ..runtime.history import read_history
    from ..slurm.api import SlurmError
    from ..slurm.cli import CliSlurmClient

    client = CliSlurmClient()
    notes = []
    try:
        runs = client.job_runs(args.job_id)
    except SlurmError as exc:
        runs = []
        notes.append(f"no accounting from sacct ({exc.stderr or exc})")
    if not runs and not notes:
        notes.append(f"sacct knows no job {args.job_id}")
    ckpt_dir = args.ckpt_dir
    if ckpt_dir is None and runs and runs[0].work_dir:
        ckpt_dir = Path(runs[0].work_dir) / ".singularity" / "ckpt" / f"job-{args.job_id}"
    history = []
    if ckpt_dir is not None:
        try:
            history = read_history(ckpt_dir)
        except FileNotFoundError:
            notes.append(f"no runtime history in {ckpt_dir} (not run with singularity-run, "
                         f"or give --ckpt-dir)")
        except PermissionError:     # checkpoint directories are private (0700)
            notes.append(f"the runtime history in {ckpt_dir} is private to the job's user "
                         f"(run this as that user or as root)")
        except ValueError as exc:
            notes.append(f"history in {ckpt_dir} is damaged: {exc}")
    if not runs and not history:
        print(f"singularity-admin job show: error: nothing known of job {args.job_id}: "
              + "; ".join(notes), file=sys.stderr)
        return 1
    rows = build_rows(runs, history)
    if args.json:
        print(json.dumps({"job_id": args.job_id, "ckpt_dir": str(ckpt_dir) if ckpt_dir else None,
                          "runs": [asdict(r) for r in rows], "notes": notes}, indent=2))
        return 0
    print(f"job {args.job_id}: {len(rows)} run(s)" + (f", checkpoints in {ckpt_dir}" if history else ""))
    print(f"{'RUN':>3} {'START':<19} {'END':<19} {'GPUS':>4} {'STEPS':>9} {'STOPPED':<9} "
          f"{'CKPT':<4} {'LOST':>9}")
    for r in rows:
        lost = "?" if r.steps_lost is None else (
            f"{r.steps_lost} st" + (f"/{r.time_lost_s:g}s" if r.time_lost_s else ""))
        print(f"{r.run:>3} {r.start:<19} {r.end:<19} {r.devices if r.devices is not None else '?':>4} "
              f"{r.steps:>9} {r.stopped:<9} {r.checkpoint:<4} {lost:>9}")
    total = sum(r.steps_lost or 0 for r in rows)
    print(f"steps lost in all: {total}" + ("" if history else " (unknown: no runtime history)"))
    for r in rows:
        if r.stopped == "killed":
            print(f"run {r.run} was killed before it wrote a checkpoint (grace time too short "
                  f"for its checkpoint?): its {r.time_lost_s:g} s of work since the previous "
                  f"checkpoint (step {r.steps.split('..')[0]}) are lost")
    for note in notes:
        print(f"note: {note}")
    return 0
