"""What each convserve feature costs a request on the event loop: ``python -m benchmarks.feature_cost``.

Every row times the code a feature runs per request, on the real objects the server uses, in a hot loop of
``--calls`` calls: thread CPU (``time.thread_time``), median of ``--rounds`` interleaved rounds, so other
processes on the box do not inflate it. A hot loop keeps caches warm: the figures are lower bounds of the
cost inside a server, and their sum is to be read beside the end-to-end difference that
``benchmarks.h2load`` measures between convserve and the plain server.

- edge: the call's request id from metadata, its CallInfo, the context variable, the in-flight count, the
  drain check and the access-log check (off), plus the grpc context reads it makes in a real loopback call
  (``invocation_metadata``, ``peer``, ``set_trailing_metadata``);
- deadlines: the stop checkpoint built once and called at the three stages of a request;
- metrics: ``ModelStats`` for one request on the inline path (started, on_batch, finished), metrics on
  minus metrics off;
- admission: ``Batcher.submit`` of one image (bounded queue, cancellation, backpressure bookkeeping) by an
  anonymous caller; fairness: the same with a client key, minus anonymous;
- logging: a generated request id.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable

import grpc

from convserve.server.calls import CallInfo, bind_call, unbind_call
from convserve.server.core.inference import Cancellation, _Stop
from convserve.server.grpc.edge import Edge
from convserve.server.health import Health
from convserve.server.observability.logs import access_log_enabled
from convserve.server.observability.request_ids import new_request_id, request_id_from_metadata

from .fair_admission_cost import submit_cost
from .metrics_cost import measure as metrics_measure

METADATA = (("user-agent", "h2load"), ("x-request-id", "bench-0001"))


def _loop_cpu_us(fn: Callable[[], None], calls: int) -> float:
    c0 = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - c0) / calls * 1e6


def edge_us(calls: int) -> float:
    """The edge's own bookkeeping per call, without grpc's context reads."""
    edge = Edge(Health(("convserve.v1.Classifier",)))

    def one() -> None:
        call = CallInfo(request_id_from_metadata(METADATA), "/inference.GRPCInferenceService/ModelInfer",
                        peer="ipv4:127.0.0.1:50000")
        token = bind_call(call)
        edge.in_flight += 1
        edge.refuse_if_draining()
        unbind_call(token)
        edge.end()
        access_log_enabled()

    return _loop_cpu_us(one, calls)


def deadline_us(calls: int) -> float:
    deadline = time.monotonic() + 3600

    def one() -> None:
        stop = _Stop(deadline, Cancellation(), "digits_lenet")
        stop()
        stop()
        stop()

    return _loop_cpu_us(one, calls)


async def context_reads_us(calls: int) -> float:
    """The grpc context reads the edge makes per call, inside a real loopback call."""
    out: list[float] = []

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        c0 = time.thread_time()
        for _ in range(calls):
            context.invocation_metadata()
            context.peer()
            context.set_trailing_metadata((("x-request-id", "bench-0001"),))
        out.append((time.thread_time() - c0) / calls * 1e6)
        return b""

    server = grpc.aio.server()
    method = grpc.unary_unary_rpc_method_handler(handler)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Edge", {"Get": method}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await channel.unary_unary("/bench.Edge/Get")(b"", timeout=60)
    finally:
        await server.stop(0)
    return out[0]


def measure(calls: int, rounds: int) -> dict[str, float]:
    """Feature → µs of event-loop thread CPU per request (medians over rounds)."""
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        samples.setdefault("edge", []).append(edge_us(calls) + asyncio.run(context_reads_us(calls)))
        samples.setdefault("deadlines", []).append(deadline_us(calls))
        m = metrics_measure(calls, 1)
        samples.setdefault("metrics", []).append(m["inline_on_us"] - m["inline_off_us"])
        samples.setdefault("logging", []).append(_loop_cpu_us(new_request_id, calls))
        submit = asyncio.run(submit_cost(1, bursts=max(1, calls // 320)))
        samples.setdefault("admission", []).append(submit["anonymous_us"])
        samples.setdefault("fairness", []).append(submit["with_client_us"] - submit["anonymous_us"])
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20_000, help="calls per feature per round")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    costs = measure(a.calls, a.rounds)
    print(f"| feature | µs per request (event-loop thread CPU, median of {a.rounds} rounds) |")
    print("|---|---|")
    for name in ("edge", "admission", "fairness", "metrics", "logging", "deadlines"):
        print(f"| {name} | {costs[name]:.1f} |")
    print(f"| **sum** | {sum(costs.values()):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
