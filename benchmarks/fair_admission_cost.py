"""What fair admission between clients adds per request, on the event-loop thread: ``Batcher.submit`` with a
client against the same without one (interleaved rounds, medians of thread CPU), and gRPC's
``context.peer()``, which the edge reads once per call for it.

``python -m benchmarks.fair_admission_cost [--rounds 6]``; a tiny numpy model, so the figures are the
batcher's bookkeeping, not inference.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import grpc
import numpy as np

from convserve.server.runtime.batcher import Batcher, BatchingPolicy

CLIENT = "ipv4:127.0.0.1:50123"


async def submit_cost(rounds: int, bursts: int = 30, concurrency: int = 32) -> dict[str, float]:
    """Event-loop thread CPU µs per request, median over rounds, for client=None and for one client."""
    b = Batcher(lambda x: x[:, :, 0, 0], BatchingPolicy(max_batch_size=32, max_queue_size=1024))
    b.start()
    x = np.zeros((1, 1, 2, 2), np.float32)
    samples: dict[str | None, list[float]] = {None: [], CLIENT: []}
    for rnd in range(rounds):
        order = (None, CLIENT) if rnd % 2 == 0 else (CLIENT, None)
        for client in order:
            t0 = time.thread_time()
            for _ in range(bursts):
                await asyncio.gather(*(b.submit(x, client=client) for _ in range(concurrency)))
            samples[client].append((time.thread_time() - t0) / (bursts * concurrency) * 1e6)
    await b.stop()
    return {
        "anonymous_us": statistics.median(samples[None]),
        "with_client_us": statistics.median(samples[CLIENT]),
    }


async def peer_cost(calls: int = 10000) -> float:
    """µs per ``context.peer()`` inside a real loopback call."""
    out: list[float] = []

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        t0 = time.perf_counter()
        for _ in range(calls):
            context.peer()
        out.append((time.perf_counter() - t0) / calls * 1e6)
        return b""

    server = grpc.aio.server()
    method = grpc.unary_unary_rpc_method_handler(handler)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Peer", {"Get": method}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await channel.unary_unary("/bench.Peer/Get")(b"", timeout=30)
    finally:
        await server.stop(0)
    return out[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    a = p.parse_args(argv)
    cost = asyncio.run(submit_cost(a.rounds))
    peer = asyncio.run(peer_cost())
    print(
        f"Batcher.submit, loop-thread CPU per request: {cost['anonymous_us']:.2f} us anonymous, "
        f"{cost['with_client_us']:.2f} us with a client "
        f"(+{cost['with_client_us'] - cost['anonymous_us']:.2f}); context.peer(): {peer:.2f} us"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
