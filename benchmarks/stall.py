"""Head-of-line check: ``senders`` clients send 16-megapixel PNGs back to back while one client sends small
good requests and another health Checks; reports the small requests' and the checks' latency percentiles.

``python -m benchmarks.stall --target 127.0.0.1:PORT --model digits_lenet --shape 1,28,28 --out r.json``
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from convserve.protos.convserve.v1 import classifier_pb2 as pb

_CLASSIFY = "/convserve.v1.Classifier/Classify"
_CHECK = "/grpc.health.v1.Health/Check"


def big_png(side: int = 4000) -> bytes:
    """A side x side RGB PNG (16 Mpx at 4000) with enough structure that decoding does real work."""
    from PIL import Image

    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    img = np.tile(tile, (side // 64 + 1, side // 64 + 1, 1))[:side, :side]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def _pct(values: list[float]) -> dict[str, float]:
    if not values:
        nan = float("nan")
        return {"count": 0, "p50_ms": nan, "p99_ms": nan, "max_ms": nan}
    a = np.asarray(values) * 1000.0
    p50, p99 = np.percentile(a, [50, 99])
    return {"count": len(values), "p50_ms": float(p50), "p99_ms": float(p99), "max_ms": float(a.max())}


async def run(target: str, model: str, shape: tuple[int, ...], senders: int, duration: float) -> dict:
    big = pb.ClassifyRequest(model=model, images=[pb.Image(encoded=big_png())]).SerializeToString()
    x = np.zeros((1, *shape), np.float32)
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=list(x.shape), data=x.tobytes())
    small = pb.ClassifyRequest(model=model, top_k=1, images=[pb.Image(tensor=tensor)]).SerializeToString()
    check = health_pb2.HealthCheckRequest().SerializeToString()
    small_lat: list[float] = []
    check_lat: list[float] = []
    big_done = [0]
    errors: dict[str, int] = {}
    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    channels = [grpc.aio.insecure_channel(target, options=opts) for _ in range(senders + 2)]
    end = time.perf_counter() + duration

    async def sender(ch: grpc.aio.Channel) -> None:
        call = ch.unary_unary(_CLASSIFY)
        while time.perf_counter() < end:
            try:
                await call(big, timeout=30)
                big_done[0] += 1
            except grpc.aio.AioRpcError as exc:
                errors[f"big:{exc.code().name}"] = errors.get(f"big:{exc.code().name}", 0) + 1

    async def prober(ch: grpc.aio.Channel, method: str, body: bytes, out: list[float], name: str) -> None:
        call = ch.unary_unary(method)
        await asyncio.sleep(1.0)  # let the big senders get going
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                await call(body, timeout=10)
                out.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError as exc:
                errors[f"{name}:{exc.code().name}"] = errors.get(f"{name}:{exc.code().name}", 0) + 1
            await asyncio.sleep(0.02)

    try:
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), 30)
        await asyncio.wait_for(asyncio.gather(
            *(sender(ch) for ch in channels[:senders]),
            prober(channels[senders], _CLASSIFY, small, small_lat, "small"),
            prober(channels[senders + 1], _CHECK, check, check_lat, "health"),
        ), duration + 60)  # fmt: skip
    finally:
        for ch in channels:
            await ch.close()
    return {"senders": senders, "duration_s": duration, "big_requests": big_done[0], "errors": errors,
            "small": _pct(small_lat), "health": _pct(check_lat)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--shape", required=True, help="C,H,W of one image")
    p.add_argument("--senders", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    shape = tuple(int(v) for v in a.shape.split(","))
    a.out.write_text(json.dumps(asyncio.run(run(a.target, a.model, shape, a.senders, a.duration))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
