"""A lifecycle that releases what it loads: unloading or replacing a version frees its ONNX Runtime
sessions (their thread pools and arenas) and batcher threads, so repeated model control and hot reload
leave the server's thread count where it was and its memory within a small slack.

The measurement is the benchmark's (``python -m benchmarks.lifecycle``, 200 cycles per phase) at fewer
cycles: before the fix each cycle left about two threads and 2.7 MB behind.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.lifecycle import measure
from convserve.server.settings import default_model_repository

CYCLES = 20


def test_unload_load_and_hot_reload_keep_threads_flat_and_memory_bounded(tmp_path: Path) -> None:
    phases = measure(Path(default_model_repository()), "digits_lenet", CYCLES, tmp_path)
    for phase in phases:
        assert phase.threads_last <= phase.threads_first, phase
        assert phase.rss_growth_mb <= 30, phase
