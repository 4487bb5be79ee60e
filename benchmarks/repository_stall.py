"""Does the repository stall health? gRPC health latency while hostile configs are read, and when quiet.

A server subprocess serves a copy of the bundled digits model with model control and repository polling
on. One thread probes grpc.health.v1 Check every 10 ms. Rounds alternate: "quiet" (probes only) and
"hostile" (the folders of convserve.testing.hostile_configs at their size limits: a 64 KiB config.pbtxt
nested 10,000 deep, one of 1,200 fields, an oversize one, a config.json nested 32,000 deep, one of 7,000
labels, a 4 MiB label file; one thread sends LoadModel for each in turn, another re-stamps their files so
that polling re-reads them too). Each phase's figure is the median over its rounds of the round's
p50/p99/max; the target is hostile p99 <= 100 ms.

    python -m benchmarks.repository_stall                 # 4 rounds of 5 s each phase, about 50 s
    python -m benchmarks.repository_stall --rounds 2 --seconds 3 --json stall.json

Exit status 0 when the hostile phase's p99 is within --target-ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc
from convserve.server.settings import default_model_repository
from convserve.testing import start_server_process
from convserve.testing.hostile_configs import write_hostile_models

TOKEN = "repository-stall-benchmark-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
PROBE_GAP_S = 0.010


def _probe(channel: grpc.Channel, seconds: float) -> list[float]:
    """Health Check latencies (s) for ``seconds``, one every PROBE_GAP_S; a failed check counts its time."""
    stub = health_pb2_grpc.HealthStub(channel)
    latencies: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        with contextlib.suppress(grpc.RpcError):
            stub.Check(health_pb2.HealthCheckRequest(), timeout=5, metadata=AUTH)
        latencies.append(time.perf_counter() - t0)
        time.sleep(PROBE_GAP_S)
    return latencies


def _attack(
    channel: grpc.Channel, repo: Path, names: list[str], stop: threading.Event, count: list[int]
) -> None:
    """LoadModel each hostile folder in turn until ``stop``; every round also re-stamps its files so that
    polling reads them again."""
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    while not stop.is_set():
        for name in names:
            if stop.is_set():
                return
            stamp = time.time_ns()
            for f in (repo / name).iterdir():
                if f.is_file():
                    os.utime(f, ns=(stamp, stamp))
            try:
                stub.LoadModel(pb.LoadModelRequest(model=name), timeout=30, metadata=AUTH)
                count[0] += 1
            except grpc.RpcError as exc:
                count[1] += 1
                print(f"LoadModel {name}: {exc.code().name}: {exc.details()}", file=sys.stderr)


def _summary(latencies: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies) * 1000.0
    p50, p99 = np.percentile(ms, [50, 99])
    return {"checks": len(ms), "p50_ms": float(p50), "p99_ms": float(p99), "max_ms": float(ms.max())}


Rounds = dict[str, list[dict[str, float]]]


def measure(rounds: int, seconds: float, workdir: Path) -> tuple[Rounds, list[int]]:
    """Start the server and run the interleaved rounds; returns per-phase round summaries and
    [LoadModel calls answered, LoadModel errors]."""
    repo = workdir / "repository"
    shutil.copytree(Path(default_model_repository()) / "digits_lenet", repo / "digits_lenet")
    names = list(write_hostile_models(repo))
    server = start_server_process(
        ["--model-repository", str(repo), "--allow-model-control", "--auth-tokens", TOKEN,
         "--repository-poll-seconds", "0.1", "--no-strict-readiness", "--metrics-port", "-1",
         "--http-port", "-1"],
        workdir / "server", metrics_port=-1, http_port=-1,
    )  # fmt: skip
    results: Rounds = {"quiet": [], "hostile": []}
    count = [0, 0]
    try:
        with grpc.insecure_channel(server.address) as probe, grpc.insecure_channel(server.address) as control:
            _probe(probe, 1.0)  # warm the channel
            for _ in range(rounds):
                results["quiet"].append(_summary(_probe(probe, seconds)))
                stop = threading.Event()
                attacker = threading.Thread(target=_attack, args=(control, repo, names, stop, count))
                attacker.start()
                try:
                    results["hostile"].append(_summary(_probe(probe, seconds)))
                finally:
                    stop.set()
                    attacker.join(60)
    finally:
        server.stop(15)
    return results, count


def main(argv: list[str] | None = None) -> int:
    doc = __doc__.splitlines()[0]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.repository_stall", description=doc)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each phase's round")
    parser.add_argument("--target-ms", type=float, default=100.0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    with tempfile.TemporaryDirectory(prefix="convserve-repository-stall-") as tmp:
        results, (loads, errors) = measure(args.rounds, args.seconds, Path(tmp))
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    print(f"gRPC health Check every {PROBE_GAP_S * 1000:.0f} ms, {args.rounds} interleaved rounds of "
          f"{args.seconds:g} s per phase; load average before {' '.join(load_before)}, "
          f"after {' '.join(load_after)}")  # fmt: skip
    print(f"hostile phase: {loads} LoadModel calls answered, {errors} failed as calls")
    print(f"{'phase':<8} {'checks':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}   (medians over rounds)")
    medians = {}
    for phase, rows in results.items():
        medians[phase] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        m = medians[phase]
        print(f"{phase:<8} {m['checks']:>7.0f} {m['p50_ms']:>8.2f} {m['p99_ms']:>8.2f} {m['max_ms']:>8.2f}")
    ok = medians["hostile"]["p99_ms"] <= args.target_ms and errors == 0
    print(f"{'PASS' if ok else 'FAIL'}: hostile p99 {medians['hostile']['p99_ms']:.1f} ms "
          f"(target <= {args.target_ms:g} ms), {errors} LoadModel call errors")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({
            "load_average_before": load_before, "load_average_after": load_after, "rounds": results,
            "medians": medians, "load_model_calls": loads, "load_model_errors": errors,
        }, indent=2))  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
