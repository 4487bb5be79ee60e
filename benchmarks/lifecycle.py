"""Model lifecycle leaks: a server subprocess through N UnloadModel/LoadModel cycles and N hot reloads.

Each cycle also classifies one image, so every cache a request fills is exercised. The server's threads
(/proc/PID/status Threads) and resident memory (VmRSS) are read after the first cycle and after the last
of each phase; a leak shows as threads growing with the cycle count (each version's ONNX Runtime thread
pools) and RSS growing by megabytes. Repository: a copy of the bundled digits model (--model-repository
and --model pick another).

    python -m benchmarks.lifecycle                  # 200 + 200 cycles, about 2-4 minutes on 2 cores
    python -m benchmarks.lifecycle --cycles 30 --json lifecycle.json

Exit status 0 when threads end where they were after the first cycle and RSS within --rss-slack-mb.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np

from convserve.common.model_config import load_config
from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc
from convserve.server.settings import default_model_repository
from convserve.testing import start_server_process

TOKEN = "lifecycle-benchmark-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@dataclass(frozen=True)
class Phase:
    """One phase's figures: threads and RSS (KiB) after its first cycle and after its last."""

    name: str
    cycles: int
    threads_first: int
    threads_last: int
    rss_first_kib: int
    rss_last_kib: int
    seconds: float

    @property
    def rss_growth_mb(self) -> float:
        return (self.rss_last_kib - self.rss_first_kib) / 1024


def _proc(pid: int) -> tuple[int, int]:
    """(threads, VmRSS KiB) of a process, from /proc."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0])


def _classify(stub: classifier_pb2_grpc.ClassifierStub, model: str, shape: tuple[int, ...]) -> None:
    x = np.zeros((1, *shape), np.float32)
    image = pb.Image(tensor=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=x.shape, data=x.tobytes()))
    stub.Classify(pb.ClassifyRequest(model=model, images=[image]), timeout=30, metadata=AUTH)


def run_phase(
    name: str, cycles: int, pid: int, step: object, stub: classifier_pb2_grpc.ClassifierStub, model: str,
    shape: tuple[int, ...],
) -> Phase:  # fmt: skip
    """``cycles`` times ``step()`` (the lifecycle change) and one Classify; sampled after 1 and after all."""
    t0 = time.perf_counter()
    first = (0, 0)
    for i in range(cycles):
        step()  # type: ignore[operator]
        _classify(stub, model, shape)
        if i == 0:
            first = _proc(pid)
    last = _proc(pid)
    return Phase(name, cycles, first[0], last[0], first[1], last[1], time.perf_counter() - t0)


def measure(repository: Path, model: str, cycles: int, workdir: Path) -> list[Phase]:
    """Start a server on a copy of ``repository`` and run both phases; returns their figures."""
    repo = workdir / "repository"
    shutil.copytree(repository / model, repo / model)
    cfg = load_config(repo / model)
    versions = sorted(int(p.name) for p in (repo / model).iterdir() if p.name.isdigit())
    graph = repo / model / str(versions[-1]) / "model.onnx"
    server = start_server_process(
        ["--model-repository", str(repo), "--allow-model-control", "--auth-tokens", TOKEN,
         "--metrics-port", "-1", "--http-port", "-1"],
        workdir / "server", metrics_port=-1, http_port=-1,
    )  # fmt: skip
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)

            def unload_load() -> None:
                stub.UnloadModel(pb.UnloadModelRequest(model=model), timeout=60, metadata=AUTH)
                stub.LoadModel(pb.LoadModelRequest(model=model), timeout=60, metadata=AUTH)

            def hot_reload() -> None:
                # A new stamp on the graph: LoadModel loads it as a replacement and retires the old one.
                stamp = time.time_ns()
                os.utime(graph, ns=(stamp, stamp))
                stub.LoadModel(pb.LoadModelRequest(model=model), timeout=60, metadata=AUTH)

            shape = tuple(cfg.input.shape)
            return [
                run_phase("unload/load", cycles, server.pid, unload_load, stub, model, shape),
                run_phase("hot reload", cycles, server.pid, hot_reload, stub, model, shape),
            ]
    finally:
        server.stop(15)


def main(argv: list[str] | None = None) -> int:
    doc = __doc__.splitlines()[0]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lifecycle", description=doc)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--model-repository", type=Path, default=Path(default_model_repository()))
    parser.add_argument("--model", default="digits_lenet")
    parser.add_argument("--rss-slack-mb", type=float, default=30.0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    load = Path("/proc/loadavg").read_text().split()[:3]
    with tempfile.TemporaryDirectory(prefix="convserve-lifecycle-") as tmp:
        phases = measure(args.model_repository, args.model, args.cycles, Path(tmp))
    print(f"model {args.model}, {args.cycles} cycles per phase, load average {' '.join(load)}")
    print(f"{'phase':<12} {'threads after 1':>16} {'after all':>10} {'RSS after 1 MB':>15} "
          f"{'after all':>10} {'growth MB':>10} {'seconds':>8}")  # fmt: skip
    ok = True
    for p in phases:
        print(f"{p.name:<12} {p.threads_first:>16} {p.threads_last:>10} {p.rss_first_kib / 1024:>15.1f} "
              f"{p.rss_last_kib / 1024:>10.1f} {p.rss_growth_mb:>10.1f} {p.seconds:>8.1f}")  # fmt: skip
        ok &= p.threads_last <= p.threads_first and p.rss_growth_mb <= args.rss_slack_mb
    print("PASS: threads flat, RSS within the slack" if ok else "FAIL: threads or RSS grew")
    if args.json:
        args.json.write_text(json.dumps({"load_average": load, "phases": [asdict(p) for p in phases]}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
