"""REST against gRPC on one server, interleaved: ``python -m benchmarks.rest [-C 1,8] [--rounds 3]``.

One convserve server (metrics off) serves both ports; each round drives the KServe v2 gRPC API
(``ModelInfer``, raw tensor) and the v2 REST API (binary-tensor extension, binary reply) with the same
LeNet single-image request, alternating which goes first. Prints medians over rounds of throughput,
latency and the server's CPU time per request (from /proc, over the measured window only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from convserve.server.model_config import load_config
from convserve.testing import loopback_command

from . import models
from .run import Case, Server, _wait_serving, drive


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-C", "--concurrency", default="1,8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=1.0)
    a = p.parse_args(argv)
    repository = Path("bench_results/models")
    repository.mkdir(parents=True, exist_ok=True)
    models.prepare_lenet(repository)
    shape = tuple(load_config(repository / models.LENET).input.shape)
    results: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="convserve-rest-") as tmp:
        work = Path(tmp)
        port_file = work / "ports.json"
        cmd = loopback_command(port_file, "--model-repository", str(repository.resolve()),
                               "--log-level", "WARNING", metrics_port=-1)
        with open(work / "server.log", "wb") as log:
            server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=models.REPO_ROOT)
        try:
            deadline = time.monotonic() + 120
            while not (port_file.is_file() and port_file.stat().st_size > 0):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start; see {work / 'server.log'}")
                time.sleep(0.1)
            ports = json.loads(port_file.read_text())
            targets = {"v2-grpc": Server(f"127.0.0.1:{ports['grpc_port']}", server.pid),
                       "rest": Server(f"127.0.0.1:{ports['http_port']}", server.pid)}
            _wait_serving(targets["v2-grpc"].target, deadline)
            for rnd in range(a.rounds):
                for c in (int(x) for x in a.concurrency.split(",")):
                    order = list(targets) if rnd % 2 == 0 else list(reversed(targets))
                    for name in order:
                        case = Case("convserve", models.LENET, "rest" if name == "rest" else "v2", 1, c)
                        result, cpu = drive(targets[name], case, shape, a.warmup, a.duration, 1, work)
                        sm = result.summary()
                        cpu_us = cpu / max(1, sm["requests"]) * 1e6
                        results.setdefault((name, c), []).append(
                            (sm["requests_per_s"], sm["p50_ms"], sm["p99_ms"], cpu_us))
                        print(f"round {rnd + 1} C={c:<3} {name:<8} {sm['requests_per_s']:7.0f} req/s "
                              f"p50 {sm['p50_ms']:.2f} p99 {sm['p99_ms']:.2f} ms  "
                              f"server CPU {cpu_us:.0f} µs/req "
                              f"errors {sm['errors']}  load {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
    print(f"\nmedians over {a.rounds} rounds (LeNet, 1 image per request)")
    for (name, c), rs in results.items():
        rps, p50, p99, cpu_us = (float(np.median([r[i] for r in rs])) for i in range(4))
        print(f"C={c:<3} {name:<8} {rps:7.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:7.2f} ms  "
              f"server CPU {cpu_us:5.0f} µs/req")
    return 0


if __name__ == "__main__":
    sys.exit(main())
