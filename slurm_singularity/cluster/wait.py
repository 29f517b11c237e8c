"""Start-up waits of the local cluster that scale with the machine's load.

Why this exists: a fixed "20 s for slurmctld" passed on an idle machine and
failed on a loaded one (a fresh clone's ``make test`` beside other work),
and it said neither why nor what the daemon was doing. A wait here

- scales its limit with the load: ``base x max(1, loadavg / CPUs)``, at most
  ``MAX_LOAD_FACTOR`` times the base;
- past that limit keeps waiting while the watched daemons' logs still grow
  (they are working, only slowly), up to ``MAX_LOAD_FACTOR x`` the limit;
- reports a watched daemon that dies at once (on two looks a poll apart),
  with its log tail, instead of waiting out the limit;
- says what it waits for every ``PROGRESS_EVERY_S`` seconds, and on failure
  which daemon, for how long, and its log tail.

The clock and the sleep are parameters so that tests run on a fake clock.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from .api import ClusterError

#: Largest factor the load may stretch a wait by, and the largest factor a
#: growing log may stretch the load-scaled limit by.
MAX_LOAD_FACTOR = 8.0
#: Seconds between two "still waiting" progress messages.
PROGRESS_EVERY_S = 5.0
#: Seconds between two looks at the predicate.
POLL_S = 0.25


@dataclass(frozen=True)
class Watched:
    """A daemon a wait watches: its death ends the wait at once."""

    #: Name used in messages (``slurmctld``, ``slurmd-n2``).
    name: str
    #: Whether the daemon still runs.
    alive: Callable[[], bool]
    #: Bytes in its log files now (growth means it is working).
    log_size: Callable[[], int]
    #: The last lines of its log, for the error message.
    log_tail: Callable[[], str]


def load_factor(loadavg: float | None = None, cpus: int | None = None) -> float:
    """``max(1, loadavg / CPUs)`` capped at ``MAX_LOAD_FACTOR``; by default
    the 1-minute load average over the CPUs this process may use."""
    if loadavg is None:
        try:
            loadavg = os.getloadavg()[0]
        except OSError:
            loadavg = 0.0
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) or 1
    return min(MAX_LOAD_FACTOR, max(1.0, loadavg / max(1, cpus)))


def wait_for(predicate: Callable[[], bool], base_timeout_s: float, what: str, *,
             watched: Sequence[Watched] = (), progress: Callable[[str], None] = lambda m: None,
             factor: float | None = None, clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep) -> float:
    """Wait until ``predicate()`` is true; return the seconds waited.

    The limit is ``base_timeout_s x factor`` (``load_factor()`` by default);
    past it the wait goes on while the logs of ``watched`` grow, up to
    ``MAX_LOAD_FACTOR`` times the limit.

    :raises ClusterError: a watched daemon died (at once, naming it, with its
        log tail), or the limit passed (naming what was awaited, for how
        long, and the watched daemons' log tails).
    """
    factor = load_factor() if factor is None else factor
    limit = base_timeout_s * factor
    cap = limit * MAX_LOAD_FACTOR
    start = clock()
    deadline = start + limit
    last_size = sum(w.log_size() for w in watched)
    next_note = start + PROGRESS_EVERY_S
    missing: set[str] = set()
    while True:
        if predicate():
            return clock() - start
        now = clock()
        for w in watched:
            # two looks a poll apart: a process just forked may not show its
            # command line yet
            if w.alive():
                missing.discard(w.name)
            elif w.name not in missing:
                missing.add(w.name)
            else:
                raise ClusterError(f"{w.name} exited after {now - start:.1f} s while waiting for "
                                   f"{what}; its log ends:\n  {w.log_tail()}")
        if now >= deadline:
            size = sum(w.log_size() for w in watched)
            if size > last_size and now < start + cap:
                last_size = size
                deadline = min(start + cap, now + base_timeout_s)
                progress(f"{what}: not yet after {now - start:.0f} s, but "
                         f"{' and '.join(w.name for w in watched)} still logging; waiting on")
            else:
                tails = "".join(f"\n{w.name}'s log ends:\n  {w.log_tail()}" for w in watched)
                raise ClusterError(f"timed out after {now - start:.0f} s waiting for {what} "
                                   f"(limit {base_timeout_s:g} s x load factor {factor:.1f})"
                                   f"{tails}")
        if now >= next_note:
            progress(f"still waiting for {what} ({now - start:.0f} s of up to "
                     f"{deadline - start:.0f} s, load factor {factor:.1f})")
            next_note = now + PROGRESS_EVERY_S
        sleep(POLL_S)
