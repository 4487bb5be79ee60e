"""Server RSS left behind per gRPC stream, by how the stream ends, beside a plain grpc.aio echo server.

Starts ``python -m convserve.server`` on loopback and drives ``ClassifyStream`` and ``ModelStreamInfer``
(alternating) with streams of ``--messages`` messages from ``--concurrency`` clients, in three modes:

- ``complete``: good messages, every reply read, the stream ends normally;
- ``bad``: every other message is refused (the reply carries the error), the stream ends normally;
- ``cancel``: good messages, the client cancels the stream after its first reply.

Each mode gets a fresh server, ``--warmup`` streams, then ``--streams`` measured ones; the server's VmRSS
is sampled every ``--streams // 10`` streams. The same ``cancel`` client then runs against a plain grpc.aio
server that only echoes (``--serve-plain``): grpcio's own cost per cancelled stream, the baseline ours is
judged against (grpcio's aio layer does not free a batch's native ops when the batch fails or its awaiter
is cancelled, which is what a client's cancel does to every read or write in flight). Linux only (/proc).

    python -m benchmarks.stream_memory                       # 3 000 warm-up + 12 000 streams per mode
    python -m benchmarks.stream_memory --streams 4000 --modes cancel --json out.json

Prints a table and, with ``--json``, writes every figure; growth is in bytes per measured stream, over the
whole run and as the median of its ten intervals (robust to a one-off step).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.inference import grpc_service_pb2 as v2pb
from convserve.testing import read_port_file, start_server_process

STREAM = "/convserve.v1.Classifier/ClassifyStream"
INFER_STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
MODES = ("complete", "bad", "cancel")
REPO_ROOT = Path(__file__).resolve().parent.parent


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def payloads(model: str, shape: tuple[int, int, int]) -> dict[str, tuple[bytes, bytes]]:
    """(good, bad) serialized request per stream method, for a model with input ``shape`` (C, H, W)."""
    x = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=list(shape), data=x[0].tobytes())
    good = pb.ClassifyRequest(model=model, top_k=3, images=[pb.Image(tensor=tensor)])
    bad = pb.ClassifyRequest(model=model, images=[pb.Image(encoded=b"not an image" * 8)])
    v2_good = v2pb.ModelInferRequest(model_name=model)
    v2_good.inputs.add(name="input", datatype="FP32", shape=[1, *shape])
    v2_good.raw_input_contents.append(x.tobytes())
    v2_bad = v2pb.ModelInferRequest(model_name=model)
    v2_bad.inputs.add(name="input", datatype="INT32", shape=[1, *shape])
    v2_bad.raw_input_contents.append(x.tobytes())
    return {
        STREAM: (good.SerializeToString(), bad.SerializeToString()),
        INFER_STREAM: (v2_good.SerializeToString(), v2_bad.SerializeToString()),
    }


@dataclass
class Drive:
    """What one batch of streams did: counts, and RSS samples as (streams done, KiB)."""

    streams: int = 0
    replies: int = 0
    cancelled: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    samples: list[tuple[int, int]] = field(default_factory=list)


async def drive(
    address: str,
    pid: int,
    requests: dict[str, tuple[bytes, bytes]],
    streams: int,
    concurrency: int,
    mode: str,
    messages: int = 8,
    sample_every: int = 0,
    timeout: float = 30.0,
) -> Drive:
    """Run ``streams`` streams (alternating the two methods) with ``concurrency`` clients on one channel."""
    out = Drive(samples=[(0, rss_kb(pid))])
    methods = sorted(requests)
    async with grpc.aio.insecure_channel(address) as channel:
        calls = {m: channel.stream_stream(m) for m in methods}

        async def client() -> None:
            while out.streams < streams:
                out.streams += 1
                n = out.streams
                method = methods[n % len(methods)]
                good, bad = requests[method]
                batch = [bad if mode == "bad" and i % 2 else good for i in range(messages)]
                call = calls[method](iter(batch), timeout=timeout)
                got = 0
                try:
                    async for _reply in call:
                        got += 1
                        if mode == "cancel":
                            call.cancel()
                            out.cancelled += 1
                            break
                except grpc.aio.AioRpcError as err:
                    if mode != "cancel":
                        key = err.code().name
                        out.failures[key] = out.failures.get(key, 0) + 1
                out.replies += got
                if mode != "cancel" and got != messages:
                    key = f"answered {got} of {messages}"
                    out.failures[key] = out.failures.get(key, 0) + 1
                if sample_every and n % sample_every == 0:
                    out.samples.append((n, rss_kb(pid)))

        await asyncio.gather(*(client() for _ in range(concurrency)))
    out.samples.append((out.streams, rss_kb(pid)))
    return out


@dataclass
class Measured:
    """One mode against one server: RSS after warm-up and at the end, growth per stream and by half."""

    server: str
    mode: str
    warmup: int
    streams: int
    seconds: float
    rss_start_kb: int
    rss_end_kb: int
    bytes_per_stream: float
    median_bytes_per_stream: float  # the median of the intervals' growth: a leak shows in every interval,
    # while a one-off step (an allocator or ONNX Runtime arena reaching a new peak under load) shows in one
    first_half_kb: int
    second_half_kb: int
    samples: list[tuple[int, int]]
    failures: dict[str, int]


def measure(
    server: str,
    address: str,
    pid: int,
    requests: dict[str, tuple[bytes, bytes]],
    mode: str,
    warmup: int,
    streams: int,
    concurrency: int,
    messages: int,
) -> Measured:
    """Warm up, then drive ``streams`` streams in ``mode`` and read the growth off the RSS samples."""
    warm = asyncio.run(drive(address, pid, requests, warmup, concurrency, mode, messages))
    t0 = time.monotonic()
    run = asyncio.run(
        drive(address, pid, requests, streams, concurrency, mode, messages, max(1, streams // 10))
    )
    seconds = time.monotonic() - t0
    samples = run.samples
    start, end = samples[0][1], samples[-1][1]
    middle = min(samples, key=lambda s: abs(s[0] - streams // 2))[1]
    slopes = [(b[1] - a[1]) * 1024 / (b[0] - a[0]) for a, b in itertools.pairwise(samples) if b[0] > a[0]]
    failures = dict(warm.failures)
    for key, count in run.failures.items():
        failures[key] = failures.get(key, 0) + count
    return Measured(
        server,
        mode,
        warmup,
        run.streams,
        round(seconds, 1),
        start,
        end,
        round((end - start) * 1024 / max(1, run.streams), 1),
        round(statistics.median(slopes), 1) if slopes else 0.0,
        middle - start,
        end - middle,
        samples,
        failures,
    )


def run_convserve(
    repository: Path, model: str, shape: tuple[int, int, int], mode: str, args: argparse.Namespace
) -> Measured:
    """A fresh convserve server (REST and metrics off: gRPC streams only) for one mode."""
    with tempfile.TemporaryDirectory(prefix="convserve-streammem-") as tmp:
        flags = ["--model-repository", str(repository)]
        env = dict(item.split("=", 1) for item in args.env)
        with start_server_process(
            flags, Path(tmp), http_port=-1, metrics_port=-1, env=env, cwd=REPO_ROOT
        ) as server:
            return measure(
                "convserve", server.address, server.pid, payloads(model, shape), mode,
                args.warmup, args.streams, args.concurrency, args.messages,
            )  # fmt: skip


def run_plain(model: str, shape: tuple[int, int, int], args: argparse.Namespace) -> Measured:
    """The same cancel client against a plain grpc.aio echo server (this module with --serve-plain)."""
    with tempfile.TemporaryDirectory(prefix="convserve-streammem-") as tmp:
        port_file = Path(tmp) / "ports.json"
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.stream_memory", "--serve-plain", str(port_file)],
            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while (ports := read_port_file(port_file)) is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("plain echo server did not start")
                time.sleep(0.05)
            return measure(
                "plain grpc.aio", f"127.0.0.1:{ports['grpc_port']}", proc.pid, payloads(model, shape),
                "cancel", args.warmup, args.streams, args.concurrency, args.messages,
            )  # fmt: skip
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def serve_plain(port_file: Path) -> None:
    """A grpc.aio server whose two stream methods echo each message's first 200 bytes (a reply-sized
    answer), on uvloop like convserve; it writes its port to ``port_file`` and serves until killed."""
    import uvloop

    async def echo(requests: object, context: grpc.aio.ServicerContext) -> None:
        async for message in requests:  # type: ignore[attr-defined]
            await context.write(message[:200])

    async def main() -> None:
        server = grpc.aio.server()
        handler = grpc.stream_stream_rpc_method_handler(echo)
        for method in (STREAM, INFER_STREAM):
            service, name = method.strip("/").split("/")
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {name: handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"grpc_port": port}))
        os.replace(tmp, port_file)
        await server.wait_for_termination()

    uvloop.run(main())


def render(results: list[Measured]) -> str:
    lines = [
        f"{'server':<15} {'mode':<9} {'streams':>8} {'s':>6} {'RSS start MB':>13} {'end MB':>8} "
        f"{'B/stream':>9} {'median':>7} {'1st half MB':>12} {'2nd half MB':>12}"
    ]
    for r in results:
        lines.append(
            f"{r.server:<15} {r.mode:<9} {r.streams:>8} {r.seconds:>6} {r.rss_start_kb / 1024:>13.1f} "
            f"{r.rss_end_kb / 1024:>8.1f} {r.bytes_per_stream:>9.0f} {r.median_bytes_per_stream:>7.0f} "
            f"{r.first_half_kb / 1024:>12.2f} "
            f"{r.second_half_kb / 1024:>12.2f}"
        )
        if r.failures:
            lines.append(f"  unexpected: {r.failures}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository")
    parser.add_argument("--model", default="digits_lenet")
    parser.add_argument("--shape", default="1,28,28", help="the model's input C,H,W")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {MODES}")
    parser.add_argument("--warmup", type=int, default=3000)
    parser.add_argument("--streams", type=int, default=12000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--messages", type=int, default=8, help="messages per stream")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain grpc.aio baseline")
    parser.add_argument("--env", action="append", default=[], help="K=V for convserve's environment")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve-plain", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_plain is not None:
        serve_plain(args.serve_plain)
        return 0
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown or args.streams < 10 or args.warmup < 0 or args.concurrency < 1 or args.messages < 1:
        wanted = f"modes of {MODES}; --streams >= 10; --warmup >= 0; --concurrency and --messages >= 1"
        print(f"error: expected {wanted}", file=sys.stderr)
        return 2
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 3:
        print("error: --shape expects C,H,W", file=sys.stderr)
        return 2
    results = [run_convserve(args.model_repository, args.model, shape, m, args) for m in modes]  # type: ignore[arg-type]
    if "cancel" in modes and not args.no_plain:
        results.append(run_plain(args.model, shape, args))  # type: ignore[arg-type]
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0 if not any(r.failures for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
