"""REST against gRPC on one server, interleaved: ``python -m benchmarks.rest [-C 1,8] [--rounds 3]
[--baseline-path DIR]``.

One convserve server (metrics off) serves both ports; each round drives the KServe v2 gRPC API
(``ModelInfer``, raw tensor) and the v2 REST API (binary-tensor extension, binary reply) with the same
LeNet single-image request, alternating which goes first. With ``--baseline-path`` a second server, run
from the convserve package under DIR (a baseline tree: ``mkdir -p /tmp/base/convserve && git archive
REV | tar -x -C /tmp/base/convserve``, then ``--baseline-path /tmp/base``), is driven over REST in the
same rounds ("rest-base"). Each round also posts big bodies to every REST server, 16 MiB of zeros and
16 MiB of "\\r\\n\\r\\n" (the worst case for a server that cuts reads at header ends), refused after
being read whole. Prints medians over rounds of throughput, latency and the server's CPU time per request
(from /proc, over the measured window only). About 40 s per round with a baseline (2 minutes for 3).
"""

from __future__ import annotations

import argparse
import http.client
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from convserve.common.model_config import load_config
from convserve.testing import ServerProcess, start_server_process

from . import models
from .run import Case, Server, cpu_seconds, drive

_BODY_BYTES = 16 * 1024 * 1024
_BODIES = {"zeros": b"\0" * _BODY_BYTES, "crlfcrlf": b"\r\n\r\n" * (_BODY_BYTES // 4)}
_BODY_POSTS = 5


def _post_bodies(port: int, pid: int, body: bytes) -> tuple[float, float]:
    """(median ms, server CPU ms) per POST of ``body`` as a binary tensor the model then refuses."""
    head = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1],"parameters":{"binary_data_size":4}}]}'
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    walls, cpu0 = [], cpu_seconds(pid)
    for _ in range(_BODY_POSTS):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        t = time.perf_counter()
        conn.request("POST", f"/v2/models/{models.LENET}/infer", head + body, headers)
        reply = conn.getresponse()
        reply.read()
        walls.append(time.perf_counter() - t)
        conn.close()
        if reply.status != 400:
            raise RuntimeError(f"expected the oversized tensor to be refused with 400, got {reply.status}")
    return float(np.median(walls)) * 1e3, (cpu_seconds(pid) - cpu0) / _BODY_POSTS * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-C", "--concurrency", default="1,8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--baseline-path", help="PYTHONPATH holding a baseline convserve package, run beside")
    a = p.parse_args(argv)
    repository = Path("bench_results/models")
    repository.mkdir(parents=True, exist_ok=True)
    models.prepare_lenet(repository)
    shape = tuple(load_config(repository / models.LENET).input.shape)
    results: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
    bodies: dict[tuple[str, str], list[tuple[float, float]]] = {}
    flags = ["--model-repository", str(repository.resolve()), "--log-level", "WARNING"]
    print(f"start {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  load {_load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="convserve-rest-") as tmp:
        work = Path(tmp)
        servers: list[ServerProcess] = []
        try:
            servers.append(
                start_server_process(flags, work, metrics_port=-1, cwd=models.REPO_ROOT, timeout=120))
            targets = {"v2-grpc": Server(servers[0].address, servers[0].pid),
                       "rest": Server(f"127.0.0.1:{servers[0].http_port}", servers[0].pid)}
            if a.baseline_path:
                servers.append(start_server_process(flags, work, metrics_port=-1, cwd=models.REPO_ROOT,
                                                    env={"PYTHONPATH": a.baseline_path}, timeout=120))
                targets["rest-base"] = Server(f"127.0.0.1:{servers[1].http_port}", servers[1].pid)
            for rnd in range(a.rounds):
                order = list(targets) if rnd % 2 == 0 else list(reversed(targets))
                for c in (int(x) for x in a.concurrency.split(",")):
                    for name in order:
                        api = "v2" if name == "v2-grpc" else "rest"
                        result, cpu = drive(targets[name], Case("convserve", models.LENET, api, 1, c), shape,
                                            a.warmup, a.duration, 1, work)
                        sm = result.summary()
                        cpu_us = cpu / max(1, sm["requests"]) * 1e6
                        results.setdefault((name, c), []).append(
                            (sm["requests_per_s"], sm["p50_ms"], sm["p99_ms"], cpu_us))
                        print(f"round {rnd + 1} C={c:<3} {name:<9} {sm['requests_per_s']:7.0f} req/s "
                              f"p50 {sm['p50_ms']:.2f} p99 {sm['p99_ms']:.2f} ms  "
                              f"server CPU {cpu_us:.0f} µs/req errors {sm['errors']}  load {_load()}",
                              flush=True)
                for name in (n for n in order if n != "v2-grpc"):
                    host_port = targets[name].target.rsplit(":", 1)[1]
                    for kind, body in _BODIES.items():
                        ms, cpu_ms = _post_bodies(int(host_port), targets[name].pid, body)
                        bodies.setdefault((name, kind), []).append((ms, cpu_ms))
                        print(f"round {rnd + 1} 16 MiB body of {kind:<8} {name:<9} {ms:7.1f} ms/POST  "
                              f"server CPU {cpu_ms:6.1f} ms/POST  load {_load()}", flush=True)
        finally:
            for server in servers:
                server.stop(30)
    print(f"\nmedians over {a.rounds} rounds (LeNet, 1 image per request); end load {_load()}")
    for (name, c), rs in results.items():
        rps, p50, p99, cpu_us = (float(np.median([r[i] for r in rs])) for i in range(4))
        print(f"C={c:<3} {name:<9} {rps:7.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:7.2f} ms  "
              f"server CPU {cpu_us:5.0f} µs/req")
    for (name, kind), rs in bodies.items():
        ms, cpu_ms = (float(np.median([r[i] for r in rs])) for i in range(2))
        print(f"16 MiB body of {kind:<8} {name:<9} {ms:7.1f} ms/POST  server CPU {cpu_ms:6.1f} ms/POST")
    return 0


def _load() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 1)[0]


if __name__ == "__main__":
    sys.exit(main())
