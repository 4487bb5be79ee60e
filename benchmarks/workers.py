"""Worker processes side by side: ``python -m benchmarks.workers [--workers 1,2] [--rounds 3] [--seconds 4]``
(``--model resnet18 --seconds 15``: the bench ResNet-18 at batch 32 instead, C = 1/4/8, in images/s).

Every listed ``convserve serve --workers N`` stays up for the whole run; rounds are interleaved and medians
reported. Load: h2load (a C load generator, so the client costs little CPU) sending KServe v2 ModelInfer,
the bundled LeNet, batch 1, as gRPC unary calls (``0x00`` + 4-byte big-endian length + the serialized
message; ``content-type: application/grpc``, ``te: trailers``), C connections of one stream each, so the
kernel spreads them over the workers. h2load does not read ``grpc-status``: successful images are counted from
the server's own ``nv_inference_count`` on /metrics. Server CPU per image is the supervisor's and the
workers' user+system time from /proc over the window. Takes about rounds × servers × concurrencies ×
(seconds + 1) s plus start-up: about 2 minutes with the defaults, 6 for ResNet-18.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from convserve.protos.inference import grpc_service_pb2 as pb
from convserve.testing import ServerProcess, start_server_process

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = {"lenet": (1, 8, 32, 128), "resnet18": (1, 4, 8)}
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _body(model: str, shape: tuple[int, ...]) -> bytes:
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    message = req.SerializeToString()
    return b"\x00" + struct.pack(">I", len(message)) + message


def _successes(server: ServerProcess) -> float:
    assert server.metrics_url is not None
    with urllib.request.urlopen(server.metrics_url, timeout=30) as reply:
        text = reply.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "nv_inference_count"  # successful images
    )


def _cpu_s(server: ServerProcess) -> float:
    pids = [server.pid, *(w["pid"] for w in server.workers())]
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) * _TICK_S
    return total


def _h2load(server: ServerProcess, body: Path, clients: int, seconds: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{server.grpc_port}/inference.GRPCInferenceService/ModelInfer"
    cmd = [
        "h2load", "-c", str(clients), "-m", "1", "-D", str(seconds),
        "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers", url,
    ]  # fmt: skip
    ok0, cpu0 = _successes(server), _cpu_s(server)
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    wall = time.monotonic() - t0
    ok, cpu = _successes(server) - ok0, _cpu_s(server) - cpu0
    latency = {}
    for line in out.splitlines():
        if line.startswith("time for request:"):
            parts = line.split()
            latency = {"mean_ms": _ms(parts[5])}
    return {
        "img_s": ok / wall,
        "server_ok": ok,
        "h2load_done": _finished(out),
        "cpu_us_per_img": cpu / ok * 1e6 if ok else float("nan"),
        **latency,
    }


def _finished(out: str) -> float:
    for line in out.splitlines():
        if line.startswith("requests:"):
            # requests: N total, N started, N done, N succeeded, ...
            return float(line.split()[7])
    return 0.0


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _ms(text: str) -> float:
    for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="worker counts to compare, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--model", choices=sorted(CONCURRENCY), default="lenet")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average {_loadavg()}")
    print(f"# python -m benchmarks.workers {' '.join(argv if argv is not None else sys.argv[1:])}")
    results: dict[tuple[int, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        body = Path(tmp) / "body.bin"
        if args.model == "lenet":
            repository = ROOT / "model_repository"
            body.write_bytes(_body("digits_lenet", (1, 1, 28, 28)))
        else:
            from benchmarks import models

            repository = ROOT / "bench_results" / "models"
            models.prepare_resnet(repository)
            body.write_bytes(_body(models.RESNET, (32, 3, 224, 224)))
        servers = {}
        for n in counts:
            flags = ["--model-repository", str(repository), "--log-level", "WARNING"]
            server = start_server_process(flags, Path(tmp) / f"w{n}", workers=n, timeout=120)
            stack.callback(server.stop)
            servers[n] = server
        for _ in range(args.rounds):
            for clients in CONCURRENCY[args.model]:
                for n, server in servers.items():
                    results.setdefault((n, clients), []).append(_h2load(server, body, clients, args.seconds))
        print(f"# after the run: load average {_loadavg()}")
    print(f"| workers | C | {args.model} img/s (median) | server CPU µs/img | ms/request | ratio to first |")
    print("|---|---|---|---|---|---|")
    for clients in CONCURRENCY[args.model]:
        first = statistics.median(r["img_s"] for r in results[(counts[0], clients)])
        for n in counts:
            runs = results[(n, clients)]
            rps = statistics.median(r["img_s"] for r in runs)
            cpu = statistics.median(r["cpu_us_per_img"] for r in runs)
            lat = statistics.median(r.get("mean_ms", float("nan")) for r in runs)
            print(f"| {n} | {clients} | {rps:,.0f} | {cpu:.0f} | {lat:.2f} | {rps / first:.2f}× |")
    print(json.dumps({f"{n}x{c}": v for (n, c), v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
