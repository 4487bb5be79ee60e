"""What recording one request's metrics costs, without a server: µs of CPU per request through
``ModelStats`` with metrics on and off.

``python -m benchmarks.metrics_cost [--requests 50000] [--repeat 5]``. Two call sequences: the inline
path (``started``, ``on_batch``, ``finished``) and the batched path (plus ``on_depth`` twice and
``on_dequeue``). The figures are thread CPU time (``time.thread_time``), best of ``--repeat``, so another
process on the box does not inflate them; a hot loop, so the server's cache-cold cost is higher.
"""

from __future__ import annotations

import argparse
import sys
import time

from convserve.server.observability.metrics import Metrics
from convserve.server.observability.stats import ModelStats

# Durations spread over the latency buckets (seconds), cycled so that every call is not the same bucket.
_SECONDS = (0.0004, 0.0011, 0.0023, 0.0048, 0.012, 0.031, 0.08, 0.6)


def _inline(stats: ModelStats, n: int) -> float:
    seconds = _SECONDS
    k = len(seconds)
    c0 = time.thread_time()
    for i in range(n):
        s = seconds[i % k]
        stats.started("classify")
        stats.on_batch(1, s * 0.5)
        stats.finished("classify", "OK", "", s, 1, s * 0.2, s * 0.1)
    return time.thread_time() - c0


def _batched(stats: ModelStats, n: int) -> float:
    seconds = _SECONDS
    k = len(seconds)
    c0 = time.thread_time()
    for i in range(n):
        s = seconds[i % k]
        stats.started("v2")
        stats.on_depth(1)
        stats.on_dequeue(s * 0.1)
        stats.on_depth(0)
        stats.on_batch(4, s * 0.5)
        stats.finished("v2", "OK", "", s, 1, s * 0.2, s * 0.1)
    return time.thread_time() - c0


def measure(requests: int, repeat: int) -> dict[str, float]:
    """µs per request, best of ``repeat``, for each (path, metrics on/off); rounds interleaved."""
    out: dict[str, float] = {}
    stats = {}
    for enabled in (True, False):
        metrics = Metrics(enabled=enabled)
        metrics.register_model("digits", "1")
        stats[enabled] = ModelStats(metrics, "digits", "1")
    for _ in range(repeat):
        for path, run in (("inline", _inline), ("batched", _batched)):
            for enabled, st in stats.items():
                key = f"{path}_{'on' if enabled else 'off'}_us"
                us = run(st, requests) / requests * 1e6
                out[key] = min(out.get(key, us), us)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50_000, help="calls per round (default 50000)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the best is kept (default 5)")
    args = parser.parse_args(argv)
    out = measure(args.requests, args.repeat)
    for path in ("inline", "batched"):
        on, off = out[f"{path}_on_us"], out[f"{path}_off_us"]
        print(f"{path:8s} metrics on {on:6.2f} µs/request   off {off:6.2f}   on-off {on - off:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
