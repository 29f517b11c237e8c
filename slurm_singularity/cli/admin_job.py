"""``singularity-admin job show JOBID``: a job's history, run by run.

Joins two sources: Slurm's accounting (``sacct``: each run's start, end,
nodes, GPUs and how Slurm ended it) and the runtime's ``history.jsonl`` in
the job's checkpoint directory (steps done, why it stopped, whether a
checkpoint was written, steps lost). Either may be missing (a plain script
has no history; a site without slurmdbd has no sacct): what is known is
shown and the rest is said to be unknown.

The checkpoint directory is where the job put it, found as the runtime
chose it (``launcher.default_ckpt_dir``): ``singularity-run --ckpt-dir`` or
``SINGULARITY_CKPT_DIR`` set in the batch script, ``--ckpt-dir`` on sbatch's
command line (sacct's SubmitLine) or in an ``#SBATCH`` line, else the default
under the job's submit directory. Each candidate is tried in that order; the
notes say which were tried when none holds a history. A job whose history is
not found has its lost work reported as unknown, never as 0.

While the job runs, the runtime's ``progress.json`` beside the history says
the current step, the rate and so the ETA; it is shown for the running run
(and by ``singularity-admin status``, through ``running_progress``).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from .admin_policy import job_group


def register(sub: argparse._SubParsersAction) -> None:
    p = job_group(sub).add_parser("show", help="a job's runs: preemptions, resizes, lost work")
    p.add_argument("job_id", type=int, metavar="JOBID")
    p.add_argument("--ckpt-dir", type=Path, default=None,
                   help="the job's checkpoint directory (default: where the job put it: "
                        "--ckpt-dir or SINGULARITY_CKPT_DIR in its batch script or submit "
                        "line, else SUBMITDIR/.singularity/ckpt/job-JOBID)")
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


_CKPT_OPTION = re.compile(r"^--ckpt-dir(?:=(.*))?$")
_CKPT_VAR = re.compile(r"^SINGULARITY_CKPT_DIR=(.*)$")


def _option_value(words: list[str], i: int) -> str | None:
    """The value of the ``--ckpt-dir`` option at ``words[i]``, else None."""
    m = _CKPT_OPTION.match(words[i])
    if not m:
        return None
    if m.group(1) is not None:
        return m.group(1)
    return words[i + 1] if i + 1 < len(words) else None


def _split(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:          # an unbalanced quote: not ours to judge
        return line.split()


def ckpt_dir_candidates(job_id: int, *, submit_line: str = "", script: str = "",
                        work_dir: str = "") -> list[tuple[str, str]]:
    """Where the job's runtime may have put its checkpoints, most specific
    first, as ``(directory, where it was said)``. Pure: takes sacct's
    SubmitLine, the batch script and the job's WorkDir as text. A value that
    uses a shell variable is kept as written; the caller finds no history
    there and says so."""
    from_run: list[tuple[str, str]] = []
    from_env: list[tuple[str, str]] = []
    from_sbatch: list[tuple[str, str]] = []
    for number, line in enumerate(script.splitlines(), 1):
        text = line.strip()
        if text.startswith("#SBATCH"):
            words = _split(text[len("#SBATCH"):])
            from_sbatch += [(v, f"#SBATCH --ckpt-dir (script line {number})")
                            for i in range(len(words))
                            if (v := _option_value(words, i)) is not None]
            continue
        words = _split(text)
        for i, word in enumerate(words):
            if (m := _CKPT_VAR.match(word)) and m.group(1):
                from_env.append((m.group(1), f"SINGULARITY_CKPT_DIR (script line {number})"))
            elif "singularity-run" in " ".join(words[:i]) and \
                    (v := _option_value(words, i)) is not None:
                from_run.append((v, f"singularity-run --ckpt-dir (script line {number})"))
    words = _split(submit_line)
    submitted = [(v, "sbatch --ckpt-dir (submit line)") for i in range(len(words))
                 if (v := _option_value(words, i)) is not None]
    out = from_run[::-1] + from_env[::-1] + submitted + from_sbatch[::-1]
    if work_dir:
        out.append((str(Path(work_dir) / ".singularity" / "ckpt" / f"job-{job_id}"),
                    "the runtime's default under the submit directory"))
    seen: set[str] = set()
    return [(d, why) for d, why in out if not (d in seen or seen.add(d))]


def job_ckpt_dirs(client, job_id: int, work_dir: str) -> list[tuple[str, str]]:
    """``ckpt_dir_candidates`` from what Slurm still knows of the job."""
    from ..slurm.api import SlurmError

    submit_line = script = ""
    try:
        submit_line = client.submit_line(job_id)
    except SlurmError:
        pass                            # no accounting: job_runs already said so
    try:
        script = client.batch_script(job_id)
    except SlurmError:
        pass                            # slurmctld no longer holds the job
    return ckpt_dir_candidates(job_id, submit_line=submit_line, script=script,
                               work_dir=work_dir)


def _find_history(client, job_id: int, runs, notes: list[str]):
    """(checkpoint directory, history) of the first candidate holding a
    history or a first run's progress; (None, []) with a note naming the
    candidates when none does."""
    from ..runtime.history import PROGRESS_NAME

    tried = []
    for where, why in job_ckpt_dirs(client, job_id, runs[0].work_dir if runs else ""):
        history = _read_history(Path(where), notes)
        if history is None:
            return Path(where), []
        if history or _exists(Path(where) / PROGRESS_NAME):
            return Path(where), history
        tried.append(f"{where} ({why})")
    if tried:
        notes.append("no runtime history in " + "; ".join(tried)
                     + " (not run with singularity-run, or give --ckpt-dir)")
    else:
        notes.append("no checkpoint directory known for the job (give --ckpt-dir)")
    return None, []


def _read_history(ckpt_dir: Path, notes: list[str]):
    """The history in ``ckpt_dir`` ([] when there is none); None, with a
    note, when it is there but cannot be read."""
    from ..runtime.history import read_history
    try:
        return read_history(ckpt_dir)
    except PermissionError:     # checkpoint directories are private (0700)
        notes.append(f"the runtime history in {ckpt_dir} is private to the job's user "
                     f"(run this as that user or as root)")
    except ValueError as exc:
        notes.append(f"history in {ckpt_dir} is damaged: {exc}")
    return None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def read_fresh_progress(ckpt_dir: Path, run_start: float | None):
    """The runtime's progress in ``ckpt_dir`` when it belongs to the run
    that started at ``run_start`` (epoch seconds; None: any); else None
    (none, another run's, unreadable)."""
    from ..runtime.history import read_progress
    try:
        rec = read_progress(ckpt_dir)
    except (OSError, ValueError):
        return None
    if rec is None or (run_start is not None and rec.start_time < run_start - 5):
        return None
    return rec


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def describe_progress(rec, now: float) -> str:
    """``step 120/1000, 3.2 steps/s, ETA 4m35s (4 s ago)``; ``?`` for
    what is not known yet."""
    total = "?" if rec.total is None else str(rec.total)
    rate = "? steps/s" if not rec.rate else f"{rec.rate:.3g} steps/s"
    eta = rec.eta_s()
    eta_text = "ETA ?" if eta is None else f"ETA {duration(max(0.0, eta - (now - rec.time)))}"
    return f"step {rec.step}/{total}, {rate}, {eta_text} ({duration(max(0.0, now - rec.time))} ago)"


def progress_json(rec, now: float) -> dict:
    eta = rec.eta_s()
    return {**asdict(rec), "eta_s": None if eta is None else round(max(0.0, eta - (now - rec.time)), 1),
            "age_s": round(max(0.0, now - rec.time), 1)}


def _transparent_runs(client, args, runs, ckpt_dir, notes):
    """A transparent job's runs (``--transparent``: no runtime history, the
    keeper's instead), from the first candidate directory holding them. The
    runtime's "no history" notes do not apply to such a job and are dropped."""
    from ..transparent import history as thistory
    if ckpt_dir is not None:
        dirs = [Path(ckpt_dir)]
    else:
        from ..slurm.api import SlurmError
        submit_line = script = ""
        try:
            submit_line = client.submit_line(args.job_id)
            script = client.batch_script(args.job_id)
        except SlurmError:
            pass
        work_dir = runs[0].work_dir if runs else ""
        dirs = [Path(w) for w, _ in ckpt_dir_candidates(
            args.job_id, submit_line=submit_line, script=script, work_dir=work_dir)]
    for d in dirs:
        try:
            found = thistory.read(d)
        except OSError:
            notes.append(f"the transparent history in {d} is private to the job's user")
            continue
        if found:
            return found, [n for n in notes if "no runtime history" not in n]
    return [], notes


def _print_transparent(job_id: int, transparent) -> None:
    print(f"job {job_id}: transparent (CRIU), {len(transparent)} run(s)")
    for t in transparent:
        print(f"{t.run:>3} {t.node:<6} {t.began:<32} {t.ended}")
        for d in t.dumps:
            print(f"      dump {d}")


def total_lost(rows: list[RunRow]) -> int | None:
    """Steps lost over all runs; None (unknown) when a run that ended
    otherwise than finished or still running has no count."""
    if any(r.steps_lost is None and r.stopped not in ("finished", "running") for r in rows):
        return None
    return sum(r.steps_lost or 0 for r in rows)


def _show(args: argparse.Namespace) -> int:
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
    history = []
    if ckpt_dir is None:
        ckpt_dir, history = _find_history(client, args.job_id, runs, notes)
    else:
        history = _read_history(ckpt_dir, notes)
        if history == []:
            notes.append(f"no runtime history in {ckpt_dir} (not run with singularity-run?)")
        history = history or []
    transparent, notes = _transparent_runs(client, args, runs, ckpt_dir, notes)
    if not runs and not history and not transparent:
        print(f"singularity-admin job show: error: nothing known of job {args.job_id}: "
              + "; ".join(notes), file=sys.stderr)
        return 1
    rows = build_rows(runs, history)
    now = time.time()
    progress = None
    running = runs[-1] if runs and runs[-1].state == "RUNNING" else None
    if ckpt_dir is not None and (running is not None or not runs):
        progress = read_fresh_progress(Path(ckpt_dir),
                                       _epoch(running.start) if running is not None else None)
        if progress is not None and running is None and now - progress.time > 60:
            progress = None             # no accounting to say it runs, and stale
    if args.json:
        print(json.dumps({"job_id": args.job_id, "ckpt_dir": str(ckpt_dir) if ckpt_dir else None,
                          "runs": [asdict(r) for r in rows],
                          "progress": progress_json(progress, now) if progress else None,
                          "steps_lost_total": total_lost(rows), "notes": notes,
                          "transparent": [asdict(t) for t in transparent]}, indent=2))
        return 0
    if transparent:
        _print_transparent(args.job_id, transparent)
    print(f"job {args.job_id}: {len(rows)} run(s)"
          + (f", checkpoints in {ckpt_dir}" if history or progress else ""))
    print(f"{'RUN':>3} {'START':<19} {'END':<19} {'GPUS':>4} {'STEPS':>9} {'STOPPED':<9} "
          f"{'CKPT':<4} {'LOST':>9}")
    for r in rows:
        lost = "?" if r.steps_lost is None else (
            f"{r.steps_lost} st" + (f"/{r.time_lost_s:g}s" if r.time_lost_s else ""))
        print(f"{r.run:>3} {r.start:<19} {r.end:<19} {r.devices if r.devices is not None else '?':>4} "
              f"{r.steps:>9} {r.stopped:<9} {r.checkpoint:<4} {lost:>9}")
    total = total_lost(rows)
    if transparent:
        print("steps: not counted (transparent mode dumps and restores the processes "
              "themselves; see the runs above)")
    elif total is None:
        unknown = ", ".join(str(r.run) for r in rows if r.steps_lost is None and
                            r.stopped not in ("finished", "running"))
        print(f"steps lost in all: unknown (run(s) {unknown} recorded no step count)")
    else:
        print(f"steps lost in all: {total}")
    for r in rows:
        if r.stopped == "killed":
            print(f"run {r.run} was killed before it wrote a checkpoint (grace time too short "
                  f"for its checkpoint?): its {r.time_lost_s:g} s of work since the previous "
                  f"checkpoint (step {r.steps.split('..')[0]}) are lost")
    if progress is not None:
        print(f"now running on {progress.devices} device(s): {describe_progress(progress, now)}")
    for note in notes:
        print(f"note: {note}")
    return 0
