"""What the dynamic batcher itself costs, without gRPC: round trip per request at one caller and
requests/s at many, against calling the model directly and against one executor hop per request.

``python -m benchmarks.batcher_overhead [--requests 5000]``; the model is a tiny numpy matmul so the
figures are the batcher's overhead (thread hand-off both ways), not inference.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import numpy as np

from convserve.server.runtime.batcher import Batcher, BatchingPolicy

_W = np.random.default_rng(0).standard_normal((16, 10)).astype(np.float32)


def _model(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1) @ _W


async def measure(requests: int, concurrency: int) -> dict[str, float]:
    """Microseconds per request at one caller (direct, executor hop, batcher) and req/s at ``concurrency``."""
    loop = asyncio.get_running_loop()
    x = np.ones((1, 1, 4, 4), np.float32)
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    for _ in range(requests):
        _model(x)
    out["direct_us"] = (time.perf_counter() - t0) / requests * 1e6
    t0 = time.perf_counter()
    for _ in range(requests):
        await loop.run_in_executor(None, _model, x)
    out["executor_hop_us"] = (time.perf_counter() - t0) / requests * 1e6
    batcher = Batcher(_model, BatchingPolicy(max_batch_size=64))
    batcher.start()
    for _ in range(100):
        await batcher.submit(x)
    t0 = time.perf_counter()
    for _ in range(requests):
        await batcher.submit(x)
    out["batcher_us"] = (time.perf_counter() - t0) / requests * 1e6

    async def caller(n: int) -> None:
        for _ in range(n):
            await batcher.submit(x)

    per = max(1, requests // concurrency)
    t0 = time.perf_counter()
    await asyncio.gather(*(caller(per) for _ in range(concurrency)))
    out[f"batcher_c{concurrency}_req_per_s"] = per * concurrency / (time.perf_counter() - t0)

    async def hop(n: int) -> None:
        for _ in range(n):
            await loop.run_in_executor(None, _model, x)

    t0 = time.perf_counter()
    await asyncio.gather(*(hop(per) for _ in range(concurrency)))
    out[f"executor_c{concurrency}_req_per_s"] = per * concurrency / (time.perf_counter() - t0)
    await batcher.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=32)
    a = p.parse_args(argv)
    for key, value in asyncio.run(measure(a.requests, a.concurrency)).items():
        print(f"{key:>28}: {value:,.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
