"""The SDK's own cost per call: ``Client.classify`` versus the bare generated stub, at batch 1.

Both send the same PNG bytes to the same server (a separate process) over one channel each, in short
alternating blocks so drift in machine load hits both alike. Two figures per variant, each the median
over blocks of the per-call mean: wall-clock latency, and the client process's CPU time (what the
SDK's Python code adds, with less of the scheduling noise of a shared machine). The async twin is
measured the same way against a bare ``grpc.aio`` stub.

    python -m benchmarks.sdk_overhead [--model-repository DIR] [--model NAME] [--calls 200] [--rounds 30]

Target (issue 7): overhead under 10% at batch 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from convserve.client import AsyncClient, Client
from convserve.client.inputs import encode_png
from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc as pb_grpc
from convserve.testing import child_env, loopback_command

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def server_process(repository: Path, start_timeout: float = 120.0) -> Iterator[str]:
    """A convserve server in its own process on an ephemeral loopback port; yields its address."""
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "ports.json"
        proc = subprocess.Popen(
            loopback_command(port_file, "--model-repository", str(repository), "--log-level", "WARNING",
                             metrics_port=-1),
            env=child_env())
        try:
            deadline = time.monotonic() + start_timeout
            while not port_file.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start (exit status {proc.poll()})")
                time.sleep(0.05)
            address = f"127.0.0.1:{json.loads(port_file.read_text())['grpc_port']}"
            with Client(address) as client:
                client.wait_until_ready(timeout=max(1.0, deadline - time.monotonic()))
            yield address
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def per_call(fn: Callable[[], Any], calls: int) -> tuple[float, float]:
    """(wall seconds, client CPU seconds) per call."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


async def per_call_async(fn: Callable[[], Any], calls: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        await fn()
    return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


def summary(bare: list[tuple[float, float]], sdk: list[tuple[float, float]]) -> dict[str, float]:
    row = {"bare_s": statistics.median(b[0] for b in bare), "sdk_s": statistics.median(s[0] for s in sdk),
           "bare_cpu_s": statistics.median(b[1] for b in bare),
           "sdk_cpu_s": statistics.median(s[1] for s in sdk)}
    row["overhead"] = row["sdk_s"] / row["bare_s"] - 1.0
    row["cpu_overhead"] = row["sdk_cpu_s"] / row["bare_cpu_s"] - 1.0
    return row


def measure_sync(address: str, model: str, image: bytes, calls: int, rounds: int) -> dict[str, float]:
    with grpc.insecure_channel(address) as channel, Client(address, model=model) as client:
        stub = pb_grpc.ClassifierStub(channel)

        def bare() -> str:
            request = pb.ClassifyRequest(model=model, images=[pb.Image(encoded=image)], top_k=5)
            return stub.Classify(request, timeout=30).results[0].predictions[0].label

        def sdk() -> str:
            return client.classify(image, top_k=5).label

        assert bare() == sdk()
        per_call(bare, calls)
        per_call(sdk, calls)
        bare_s, sdk_s = [], []
        for _ in range(rounds):
            bare_s.append(per_call(bare, calls))
            sdk_s.append(per_call(sdk, calls))
    return summary(bare_s, sdk_s)


async def measure_async(address: str, model: str, image: bytes, calls: int, rounds: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(address) as channel, AsyncClient(address, model=model) as client:
        stub = pb_grpc.ClassifierStub(channel)

        async def bare() -> str:
            request = pb.ClassifyRequest(model=model, images=[pb.Image(encoded=image)], top_k=5)
            return (await stub.Classify(request, timeout=30)).results[0].predictions[0].label

        async def sdk() -> str:
            return (await client.classify(image, top_k=5)).label

        assert await bare() == await sdk()
        await per_call_async(bare, calls)
        await per_call_async(sdk, calls)
        bare_s, sdk_s = [], []
        for _ in range(rounds):
            bare_s.append(await per_call_async(bare, calls))
            sdk_s.append(await per_call_async(sdk, calls))
    return summary(bare_s, sdk_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--model", default=None, help="model to call (default: the repository's first)")
    parser.add_argument("--calls", type=int, default=200, help="calls per block")
    parser.add_argument("--rounds", type=int, default=30, help="alternating blocks per variant")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    with server_process(args.model_repository) as address:
        with Client(address) as client:
            model = args.model or next(m.name for m in client.models() if m.ready)
            channels, height, width = client.model(model).input.shape
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
        image = encode_png(pixels)
        rows = {"sync": measure_sync(address, model, image, args.calls, args.rounds),
                "async": asyncio.run(measure_async(address, model, image, args.calls, args.rounds))}

    print(f"SDK overhead per call, batch 1, model {model} ({channels}x{height}x{width} PNG, {len(image)} B), "
          f"{args.rounds} x {args.calls} calls per variant")
    print(f"{'twin':6} {'bare stub µs':>13} {'SDK µs':>9} {'overhead':>9}   "
          f"{'bare CPU µs':>12} {'SDK CPU µs':>11} {'CPU overhead':>13}")
    for twin, row in rows.items():
        print(f"{twin:6} {row['bare_s'] * 1e6:13.1f} {row['sdk_s'] * 1e6:9.1f} {row['overhead']:9.1%}   "
              f"{row['bare_cpu_s'] * 1e6:12.1f} {row['sdk_cpu_s'] * 1e6:11.1f} {row['cpu_overhead']:13.1%}")
    if args.out:
        args.out.write_text(json.dumps({
            "model": model, "calls": args.calls, "rounds": args.rounds, "target_overhead": 0.10,
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_implementation()} "
                       f"{platform.python_version()}, grpcio {grpc.__version__}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
