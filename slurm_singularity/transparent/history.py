"""A transparent job's history, run by run, for ``job show``.

The keeper appends one JSON line per event to
``<ckpt-dir>/transparent-history.jsonl`` (the user's file): ``start`` or
``restore`` (a run began), ``dump`` (time, image, bytes, pause, reason) and
``exit`` (the command ended by itself). A run ends with its preemption dump
or its exit. Grouping the lines is pure; reading them is one function.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

#: The keeper's history file, in the job's checkpoint directory.
FILE = "transparent-history.jsonl"


@dataclass
class TransparentRun:
    """One run of a transparent job."""

    run: int
    node: str
    #: "start" (the script from the top) or "restore <image> in <s> s".
    began: str
    #: One line per dump: time, reason, image, size, pause.
    dumps: list[str] = field(default_factory=list)
    #: "preempted" (ended by its dump), "exit <code>", or "running".
    ended: str = "running"


def group(events: list[dict]) -> list[TransparentRun]:
    runs: list[TransparentRun] = []
    for e in events:
        kind = e.get("event")
        if kind in ("start", "restore"):
            began = "start" if kind == "start" else (
                f"restore {e.get('image')} in {e.get('restore_s', '?')} s")
            runs.append(TransparentRun(len(runs) + 1, str(e.get("node", "?")), began))
        elif not runs:
            continue
        elif kind == "dump":
            stamp = time.strftime("%H:%M:%S", time.localtime(float(e.get("time", 0))))
            runs[-1].dumps.append(
                f"{stamp} {e.get('reason')} {e.get('image')} "
                f"{int(e.get('bytes', 0)) / 1e6:.1f} MB pause {e.get('pause_s')} s")
            if e.get("reason") == "preempt":
                runs[-1].ended = "preempted"
        elif kind == "exit":
            runs[-1].ended = (f"exit {e['code']}" if "code" in e else f"signal {e.get('signal')}")
    return runs


def read(ckpt_dir: Path) -> list[TransparentRun] | None:
    """The runs recorded in ``ckpt_dir``; None when there is no history.

    :raises OSError: it exists but cannot be read (private to the user).
    """
    path = ckpt_dir / FILE
    if not path.exists():
        return None
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue                    # a line cut by a crash
    return group(events)
