"""Health latency while two clients flood the REST port with JSON bodies built to stall a parser.

Each round starts the server (this tree's, and with ``--baseline-path DIR`` also one run from the convserve
packages under DIR, interleaved) and measures health probes, REST ``GET /v2/health/ready`` and gRPC
``Health.Check`` alternately every 10 ms from this process, first with no load ("idle"), then while two
flooder processes post, in turn: 10^7 numbers (20 MB), 2.5 M one-element arrays (10 MB), and a
well-formed batch of 256 LeNet images as JSON (200 k numbers, accepted and run). Reports each probe's
p50/p99/max per round and the medians over rounds, the flood's reply statuses, and the load average.

``python -m benchmarks.json_flood [--rounds 3] [--seconds 15] [--baseline-path DIR]``
(a baseline tree: ``mkdir -p /tmp/base/convserve && git archive REV | tar -x -C /tmp/base/convserve``, then
``--baseline-path /tmp/base``). About 25 s per server per round (2.5 minutes for 3 rounds with a baseline).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convserve.testing import start_server_process

REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"
MODEL = "digits_lenet"


def _bodies() -> list[tuple[str, bytes]]:
    numbers = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[10000000],"data":[' + b",".join(
        [b"0.5"] * 10_000_000
    ) + b"]}]}"
    arrays = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[2500000,1],"data":[' + b",".join(
        [b"[0]"] * 2_500_000
    ) + b"]}]}"
    x = np.round(np.random.default_rng(0).random((256, 1, 28, 28)), 3)
    tensor = {"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    lenet = json.dumps({"inputs": [tensor]}).encode()
    return [("10^7 numbers", numbers), ("2.5M arrays", arrays), ("LeNet b256 JSON", lenet)]


def _flood(port: int, stop_at: float, out: mp.Queue) -> None:
    """Post the bodies in turn until ``stop_at`` (time.time()); report the reply statuses per body."""
    bodies = _bodies()
    seen: Counter[str] = Counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    i = 0
    while time.time() < stop_at and i < 100_000:
        name, body = bodies[i % len(bodies)]
        i += 1
        try:
            conn.request("POST", f"/v2/models/{MODEL}/infer", body, {"Content-Type": "application/json"})
            reply = conn.getresponse()
            reply.read()
            seen[f"{name}: {reply.status}"] += 1
        except (OSError, http.client.HTTPException) as exc:
            seen[f"{name}: {type(exc).__name__}"] += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    out.put(dict(seen))


def _probe(http_port: int, grpc_address: str, seconds: float) -> dict[str, list[float]]:
    """REST and gRPC health probes alternately every 10 ms for ``seconds``; latencies in seconds."""
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
    lat: dict[str, list[float]] = {"rest": [], "grpc": []}
    with grpc.insecure_channel(grpc_address) as ch:
        check = health_pb2_grpc.HealthStub(ch).Check
        check(health_pb2.HealthCheckRequest(), timeout=10)
        end = time.perf_counter() + seconds
        n = 0
        while time.perf_counter() < end and n < 100_000:
            n += 1
            t = time.perf_counter()
            if n % 2:
                conn.request("GET", "/v2/health/ready")
                reply = conn.getresponse()
                reply.read()
                assert reply.status == 200, reply.status
                lat["rest"].append(time.perf_counter() - t)
            else:
                check(health_pb2.HealthCheckRequest(), timeout=10)
                lat["grpc"].append(time.perf_counter() - t)
            time.sleep(max(0.0, 0.01 - (time.perf_counter() - t)))
    conn.close()
    return lat


def _stats(values: list[float]) -> tuple[float, float, float]:
    a = np.asarray(values) * 1000.0
    p50, p99 = np.percentile(a, [50, 99])
    return float(p50), float(p99), float(a.max())


def _one(name: str, path: str | None, seconds: float, work: Path) -> dict[str, tuple[float, float, float]]:
    flags = ["--model-repository", str(REPOSITORY), "--log-level", "WARNING", "--metrics-port", "-1"]
    env = {"PYTHONPATH": path} if path else None
    server = start_server_process(flags, work, env=env)
    try:
        out: dict[str, tuple[float, float, float]] = {}
        for kind, lat in _probe(server.http_port, server.address, 3.0).items():
            out[f"idle {kind}"] = _stats(lat)
        ctx = mp.get_context("spawn")
        queue: mp.Queue = ctx.Queue()
        stop_at = time.time() + seconds + 2.0
        flooders = [ctx.Process(target=_flood, args=(server.http_port, stop_at, queue)) for _ in range(2)]
        for f in flooders:
            f.start()
        time.sleep(2.0)  # the flooders build their bodies (~1 s) before the measured window
        load = os.getloadavg()[0]
        for kind, lat in _probe(server.http_port, server.address, seconds).items():
            out[f"flood {kind}"] = _stats(lat)
        statuses: Counter[str] = Counter()
        for _ in flooders:
            statuses.update(queue.get(timeout=120))
        for f in flooders:
            f.join(60)
        print(f"  {name}: flood replies {dict(sorted(statuses.items()))}, load {load:.2f}", flush=True)
    finally:
        server.stop()
    return out


def _now() -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return f"{stamp}, loadavg {Path('/proc/loadavg').read_text().strip()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=15.0, help="flood window per round and server")
    p.add_argument("--baseline-path", help="PYTHONPATH holding a baseline convserve package, run beside")
    a = p.parse_args(argv)
    variants = [("this tree", None)] + ([("baseline", a.baseline_path)] if a.baseline_path else [])
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    print(f"start {_now()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="json-flood-") as tmp:
        for rnd in range(a.rounds):
            order = variants if rnd % 2 == 0 else variants[::-1]
            for name, path in order:
                print(f"round {rnd + 1} {name}", flush=True)
                for key, st in _one(name, path, a.seconds, Path(tmp)).items():
                    results.setdefault((name, key), []).append(st)
                    print(f"    {key:<11} p50 {st[0]:7.2f}  p99 {st[1]:8.2f}  max {st[2]:8.2f} ms")
    print(f"\nmedians over {a.rounds} rounds (health probe latency, ms; target: flood p99 <= 100)")
    for (name, key), rs in results.items():
        p50, p99, mx = (float(np.median([r[i] for r in rs])) for i in range(3))
        print(f"{name:<10} {key:<11} p50 {p50:7.2f}  p99 {p99:8.2f}  max {mx:8.2f}")
    print(f"end {_now()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
