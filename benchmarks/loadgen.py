"""Closed-loop load generator (gRPC, or the v2 REST API with ``--api rest``): C requests in flight for a
fixed time, run as its own process(es).

Requests are serialized once and sent as bytes (no per-call protobuf work in the client), and unary
replies are not parsed, so the client spends as little of the shared CPU as a Python client can; the
first reply of every run is parsed and checked, so a server answering garbage is caught.

One process: ``python -m benchmarks.loadgen --target 127.0.0.1:PORT --api classify --model digits_lenet
--shape 1,28,28 --batch 1 --concurrency 32 --warmup 2 --duration 8 --start-at EPOCH --out result.json``.
The runner starts several of these with the same ``--start-at`` and merges their results
(:func:`merge`), so a load one Python process cannot generate can be spread over processes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

from convserve.protos.convserve.v1 import classifier_pb2 as cpb
from convserve.protos.inference import grpc_service_pb2 as vpb

APIS = ("classify", "v2", "stream", "rest")
_CLASSIFIER = cpb.DESCRIPTOR.services_by_name["Classifier"].full_name
_V2 = vpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_MAX_MESSAGE = 256 * 1024 * 1024
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclass(frozen=True)
class Load:
    """What to send, how hard, and for how long."""

    api: str
    model: str
    shape: tuple[int, int, int]  # C, H, W of one image
    batch: int  # images per request
    concurrency: int  # requests in flight (stream: messages in flight on one stream)
    warmup: float  # seconds of load before measuring
    duration: float  # seconds measured
    input_name: str = "input"
    version: int = 0  # 0: the server's latest ready version


@dataclass
class Result:
    """What one or several load processes measured inside the window."""

    requests: int = 0
    images: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    latencies_us: list[int] = field(default_factory=list)
    late_start: bool = False

    def summary(self) -> dict[str, float | int | dict[str, int] | bool]:
        lat = np.asarray(self.latencies_us, dtype=np.float64) / 1000.0
        pct = np.percentile(lat, [50, 90, 99]) if len(lat) else [float("nan")] * 3
        return {
            "requests": self.requests,
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "images_per_s": self.images / self.seconds if self.seconds else 0.0,
            "requests_per_s": self.requests / self.seconds if self.seconds else 0.0,
            "p50_ms": float(pct[0]),
            "p90_ms": float(pct[1]),
            "p99_ms": float(pct[2]),
            "errors": dict(self.errors),
            "late_start": self.late_start,
        }


def payload(load: Load, seed: int = 0) -> bytes:
    """One serialized request of ``load.batch`` random images in the model's float32 layout."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((load.batch, *load.shape)).astype(np.float32)
    if load.api in ("classify", "stream"):
        tensor = cpb.Tensor(dtype=cpb.DATA_TYPE_FLOAT32, shape=list(x.shape), data=x.tobytes())
        req = cpb.ClassifyRequest(model=load.model, version=load.version, images=[cpb.Image(tensor=tensor)],
                                  top_k=1)
        return req.SerializeToString()
    if load.api == "v2":
        inp = vpb.ModelInferRequest.InferInputTensor(name=load.input_name, datatype="FP32",
                                                     shape=list(x.shape))
        return vpb.ModelInferRequest(model_name=load.model, model_version=str(load.version or ""),
                                     inputs=[inp], raw_input_contents=[x.tobytes()]).SerializeToString()
    if load.api == "rest":  # the binary-tensor extension: JSON header, then the raw tensor; binary reply
        header = json.dumps({
            "inputs": [{"name": load.input_name, "datatype": "FP32", "shape": list(x.shape),
                        "parameters": {"binary_data_size": x.nbytes}}],
            "parameters": {"binary_data_output": True},
        }).encode()
        return len(header).to_bytes(4, "little") + header + x.tobytes()
    raise ValueError(f"api must be one of {APIS}, got {load.api!r}")


def check_reply(load: Load, reply: bytes) -> None:
    """Parse one reply and check it answers ``load.batch`` images; raise RuntimeError if not."""
    if load.api == "classify":
        n = len(cpb.ClassifyResponse.FromString(reply).results)
    elif load.api == "stream":
        msg = cpb.ClassifyStreamResponse.FromString(reply)
        if msg.error_code:
            raise RuntimeError(f"stream reply carries error {msg.error_code}: {msg.error_message}")
        n = len(msg.response.results)
    elif load.api == "rest":
        n = int(json.loads(reply)["outputs"][0]["shape"][0])
    else:
        r = vpb.ModelInferResponse.FromString(reply)
        n = int(r.outputs[0].shape[0]) if r.outputs else 0
    if n != load.batch:
        raise RuntimeError(f"{load.api}: expected results for {load.batch} images, got {n}")


async def _unary(load: Load, channel: grpc.aio.Channel, start: float, t_measure: float, t_end: float,
                 result: Result) -> None:
    method = f"/{_CLASSIFIER}/Classify" if load.api == "classify" else f"/{_V2}/ModelInfer"
    call = channel.unary_unary(method)  # no serializers: bytes in, bytes out
    body = payload(load)
    check_reply(load, await call(body, timeout=60))
    lat = result.latencies_us
    errors = result.errors
    clock = time.perf_counter

    async def worker() -> None:
        while True:
            t0 = clock()
            if t0 >= t_end:
                return
            try:
                await call(body, timeout=30)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                continue
            t1 = clock()
            if t_measure <= t1 <= t_end:  # throughput counts completions inside the window
                lat.append(int((t1 - t0) * 1e6))

    while clock() < start:
        await asyncio.sleep(min(0.05, start - clock()))
    await asyncio.gather(*(worker() for _ in range(load.concurrency)))


def _stream_error(reply: bytes) -> int:
    """The error_code of a serialized ClassifyStreamResponse without parsing it (0 when absent).

    Fields are written in number order, so the reply is [1: response][2: error_code]...; skipping the
    length-delimited field 1 leaves error_code's tag (0x10) first when there is one.
    """
    pos = 0
    if reply[:1] == b"\x0a":  # field 1, length-delimited: skip it
        pos, size, shift = 1, 0, 0
        while True:
            b = reply[pos]
            pos += 1
            size |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        pos += size
    if reply[pos : pos + 1] != b"\x10":
        return 0
    code, shift = 0, 0
    pos += 1
    while True:
        b = reply[pos]
        pos += 1
        code |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return code


async def _stream(load: Load, channel: grpc.aio.Channel, start: float, t_measure: float, t_end: float,
                  result: Result) -> None:
    """One bidirectional stream with ``concurrency`` messages in flight. The server answers in request
    order, so replies are matched to send times first in, first out, and only scanned for an error code
    (the unary mode does not parse replies either); the first reply is parsed and checked in full."""
    body = payload(load)
    call = channel.stream_stream(f"/{_CLASSIFIER}/ClassifyStream")
    clock = time.perf_counter
    sent: collections.deque[float] = collections.deque()
    window = asyncio.Semaphore(load.concurrency)
    done_sending = asyncio.Event()
    while clock() < start:
        await asyncio.sleep(min(0.05, start - clock()))

    async def requests():
        while clock() < t_end:
            await window.acquire()
            if clock() >= t_end:
                break
            sent.append(clock())
            yield body
        done_sending.set()

    stream = call(requests(), timeout=load.warmup + load.duration + 60)
    checked = False
    async for reply in stream:
        t1 = clock()
        t0 = sent.popleft() if sent else None
        window.release()
        code = _stream_error(reply)
        if code:
            key = _CODE_NAMES.get(code, str(code))
            result.errors[key] = result.errors.get(key, 0) + 1
            continue
        if not checked:
            check_reply(load, reply)
            checked = True
        if t0 is not None and t_measure <= t1 <= t_end:
            result.latencies_us.append(int((t1 - t0) * 1e6))
        if done_sending.is_set() and not sent:
            break
    stream.cancel()


async def _rest(
    load: Load, target: str, start: float, t_measure: float, t_end: float, result: Result
) -> None:
    """``concurrency`` keep-alive HTTP connections, each posting the same binary-tensor body in a loop."""
    import aiohttp

    blob = payload(load)
    n = int.from_bytes(blob[:4], "little")
    body, headers = blob[4:], {"Inference-Header-Content-Length": str(n)}
    url = f"http://{target}/v2/models/{load.model}/infer"
    clock = time.perf_counter
    connector = aiohttp.TCPConnector(limit=load.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(url, data=body, headers=headers) as reply:
            data = await reply.read()
            if reply.status != 200:
                raise RuntimeError(f"rest: HTTP {reply.status}: {data[:200]!r}")
            check_reply(load, data[: int(reply.headers["Inference-Header-Content-Length"])])

        async def worker() -> None:
            while True:
                t0 = clock()
                if t0 >= t_end:
                    return
                async with session.post(url, data=body, headers=headers) as reply:
                    await reply.read()
                    status = reply.status
                if status != 200:
                    result.errors[f"HTTP_{status}"] = result.errors.get(f"HTTP_{status}", 0) + 1
                    continue
                t1 = clock()
                if t_measure <= t1 <= t_end:
                    result.latencies_us.append(int((t1 - t0) * 1e6))

        while clock() < start:
            await asyncio.sleep(min(0.05, start - clock()))
        await asyncio.gather(*(worker() for _ in range(load.concurrency)))


async def _generate_rest(load: Load, target: str, start_at: float) -> Result:
    result = Result()
    start = time.perf_counter() + max(0.0, start_at - time.time())
    result.late_start = start_at < time.time()
    t_measure = start + load.warmup
    t_end = t_measure + load.duration
    await asyncio.wait_for(_rest(load, target, start, t_measure, t_end, result),
                           load.warmup + load.duration + 120 + max(0.0, start_at - time.time()))
    result.requests = len(result.latencies_us)
    result.images = result.requests * load.batch
    result.seconds = load.duration
    return result


async def generate(load: Load, target: str, start_at: float) -> Result:
    """Connect, wait for ``start_at`` (epoch seconds), warm up, measure; the whole run is bounded."""
    if load.api == "rest":
        return await _generate_rest(load, target, start_at)
    options = [("grpc.max_send_message_length", _MAX_MESSAGE),
               ("grpc.max_receive_message_length", _MAX_MESSAGE)]
    result = Result()
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        # Map the shared epoch start onto this process's perf_counter clock.
        start = time.perf_counter() + max(0.0, start_at - time.time())
        result.late_start = start_at < time.time()
        t_measure = start + load.warmup
        t_end = t_measure + load.duration
        run = _stream if load.api == "stream" else _unary
        await asyncio.wait_for(run(load, channel, start, t_measure, t_end, result),
                               load.warmup + load.duration + 120 + max(0.0, start_at - time.time()))
    result.requests = len(result.latencies_us)
    result.images = result.requests * load.batch
    result.seconds = load.duration
    return result


def merge(results: list[Result]) -> Result:
    """Combine processes that ran the same window: counts add, latencies pool."""
    out = Result(seconds=max((r.seconds for r in results), default=0.0))
    for r in results:
        out.requests += r.requests
        out.images += r.images
        out.latencies_us += r.latencies_us
        out.late_start = out.late_start or r.late_start
        for k, v in r.errors.items():
            out.errors[k] = out.errors.get(k, 0) + v
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="host:port of the gRPC server (of REST for --api rest)")
    p.add_argument("--api", choices=APIS, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--input-name", default="input")
    p.add_argument("--version", type=int, default=0, help="model version (gRPC APIs); default the latest")
    p.add_argument("--shape", required=True, help="C,H,W of one image")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--start-at", type=float, default=0.0, help="epoch seconds at which the warm-up starts")
    p.add_argument("--out", type=Path, required=True, help="where to write the result JSON")
    a = p.parse_args(argv)
    c, h, w = (int(v) for v in a.shape.split(","))
    load = Load(api=a.api, model=a.model, shape=(c, h, w), batch=a.batch, concurrency=a.concurrency,
                warmup=a.warmup, duration=a.duration, input_name=a.input_name, version=a.version)
    result = asyncio.run(generate(load, a.target, a.start_at or time.time()))
    a.out.write_text(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
