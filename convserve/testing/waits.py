"""Polling with a deadline: what tests use instead of sleeping to synchronise."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["poll_until"]


def poll_until(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.02) -> bool:
    """True as soon as ``predicate()`` is; after ``timeout`` seconds (monotonic), its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
