"""Expensive model runs across worker processes: every usable core, one run at a time, machine-wide.

Worker processes split ONNX Runtime's threads (cores ÷ workers) so that they never oversubscribe the cores.
That is right for cheap models, whose requests spread over the workers, but it halves a big model's runs:
one client sending ResNet-18 batches over one connection reaches one worker, whose runs get half the
threads (measured: 0.54-0.58x the img/s of one worker). So the supervisor hands its workers a *core
share*: a model whose runs are expensive gets a session with a thread per usable core, and each of its
runs holds an exclusive lock on a file in the supervisor's private run folder (``flock``, which the kernel
releases if the holder dies). Threads busy at once still never exceed the cores, and a lone big-batch
client gets all of them; concurrent big runs in different workers take turns, as they would in one
process. Cheap models are untouched: they run inline or on their split share and never take the lock.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CoreShare", "configure", "current"]


@dataclass
class CoreShare:
    """All ``cores`` threads for an expensive run, under the machine-wide lock at ``lock_path``."""

    cores: int
    lock_path: Path
    _fd: int | None = field(default=None, init=False, repr=False)
    # flock excludes other processes, not this one's threads (they share the open file): a thread lock too.
    _local: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the cores for one run (blocking: call it from the batcher's threads, never the loop)."""
        with self._local:
            if self._fd is None:
                self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)


_current: CoreShare | None = None


def configure(share: CoreShare | None) -> None:
    """This process's share (a worker sets it from its supervisor's plan before loading models)."""
    global _current
    _current = share


def current() -> CoreShare | None:
    """The core share of this process, or None (a single process, or threads set by the user)."""
    return _current
