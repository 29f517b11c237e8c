"""Polling with a deadline, for tests that wait on real processes.

One helper for every test that waits for a cluster, a job or a file to
reach a state: the failure names what was awaited and for how long.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str,
               every: float = 0.1) -> T:
    """Call ``predicate`` every ``every`` seconds until it returns a true
    value, and return that value.

    :raises AssertionError: not within ``timeout`` seconds; the message
        names ``what``.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)
