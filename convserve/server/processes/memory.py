"""Handing freed heap memory back to the OS after large messages (glibc ``malloc_trim``).

A max-size message passes through gRPC core in many small slices and through several copies; once the
call ends the memory is free but stays in glibc's heaps and arenas, so the process RSS stays at its peak
(measured: 60 refused 63 MiB messages left 1.1-3.4 GB resident after 10 s idle, whatever
MALLOC_ARENA_MAX or the mmap threshold). ``malloc_trim(0)`` returns those free pages. It walks every
arena under its lock, so it runs on its own thread, only after a large message was seen, at most once
per ``min_interval`` seconds. Where the C library has no ``malloc_trim`` (musl, macOS) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

__all__ = ["LARGE_MESSAGE_BYTES", "HeapTrimmer", "malloc_trim"]

# Messages from this size on are "large": below it the heap reuses the memory for the next requests.
LARGE_MESSAGE_BYTES = 1024 * 1024


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()


def malloc_trim() -> bool:
    """Return free heap memory to the OS now (blocking); False where the C library cannot."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


class HeapTrimmer:
    """A background thread that trims the heap after ``note`` saw a large message.

    The first trim comes ``delay`` seconds after the message (its call has usually finished and dropped
    its buffers by then); while large messages keep coming, one trim every ``min_interval`` seconds; and
    a last one once ``settle`` seconds pass without any, for calls that held their buffers longer.
    """

    def __init__(
        self,
        threshold: int = LARGE_MESSAGE_BYTES,
        delay: float = 0.2,
        min_interval: float = 0.5,
        settle: float = 2.0,
    ) -> None:
        self.threshold, self.delay, self.min_interval, self.settle = threshold, delay, min_interval, settle
        self.trims = 0
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def note(self, size: int) -> None:
        """Called with each received message's size (any thread); a no-op for small messages."""
        if size >= self.threshold:
            self._wake.set()

    def start(self) -> None:
        """Start the thread (nothing to start where the C library has no malloc_trim)."""
        if self._thread is None and _malloc_trim is not None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="convserve-heap-trim", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _trim_after(self, seconds: float) -> bool:
        time.sleep(seconds)
        if self._stopping:
            return False
        malloc_trim()
        self.trims += 1
        return True

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping or not self._trim_after(self.delay):
                return
            while self._wake.wait(self.settle):  # more large messages: keep trimming, rate-limited
                self._wake.clear()
                if self._stopping or not self._trim_after(self.min_interval):
                    return
            if self._stopping or not self._trim_after(0.0):
                return
