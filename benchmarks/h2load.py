"""convserve against its baselines under a C load generator: ``python -m benchmarks.h2load``.

h2load (Debian's nghttp2-client) costs the shared cores far less CPU per request than a Python client, so
the servers, not the client, set the figures. It sends a gRPC unary call as an HTTP/2 POST of the framed
message (``0x00`` + 4-byte big-endian length + the serialized ModelInferRequest) with ``content-type:
application/grpc`` and ``te: trailers``. It does not read the ``grpc-status`` trailer, so every round is
checked against the server's own success counter (convserve's ``convserve_requests_total``, the baselines'
``baseline_requests_total``): a round whose counts disagree, or in which the server counted a failure,
stops the run.

Every server stays up for the whole run and rounds interleave them (order reversed every other round), so
load from elsewhere on a shared box hits all alike; medians over rounds are printed: req/s, img/s, p50/p99
(from h2load's per-request log), the server's CPU per request (user + system of its whole process tree,
from /proc) and the ratio to the reference server measured in the same round. Each round also says how
many cores the server, h2load and the whole machine kept busy, so a server held back by a full machine
(or by its own single thread) is told apart from a slow one; the run ends with the share of CPU time
the hypervisor took (steal).

    python -m benchmarks.h2load                                  # convserve vs plain/inline/2-process/empty
    python -m benchmarks.h2load --convserve "w1=--workers 1" --convserve "w2=--workers 2" -C 32,128
    python -m benchmarks.h2load --model resnet --batch 32 -C 1,4 --baselines plain
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from convserve.common.model_config import load_config
from convserve.protos.inference import grpc_service_pb2 as vpb
from convserve.testing import loopback_command

from . import models
from .run import Server, _process

PATH = "/inference.GRPCInferenceService/ModelInfer"
# name -> (baseline_server.py flags, what it is)
BASELINES = {
    "plain": (["--mode", "plain"], "grpc.aio, one session.run per request in the default executor"),
    "inline": (["--mode", "inline"], "grpc.aio, the model run inline on the event loop"),
    "inline-2proc": (["--mode", "inline", "--processes", "2"],
                     "two processes of the inline server sharing the port (SO_REUSEPORT)"),
    "empty": (["--mode", "empty"], "canned reply, no model"),
}  # fmt: skip


@dataclass(frozen=True)
class Target:
    """A running server: where to send, whose CPU to count, where its success counter is."""

    name: str
    server: Server
    metrics_url: str
    counter: str  # the family (without _total) counting finished requests by `code`


@dataclass(frozen=True)
class Sample:
    """One server's figures for one round at one concurrency."""

    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float
    requests: int
    loadavg: float
    server_cores: float  # the server's process tree: CPU seconds per second of the measured run
    client_cores: float  # h2load itself, the same way: a load generator near a core is the bottleneck
    box_busy_cores: float  # every process on the machine (/proc/stat, steal and idle excluded)


def frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: uncompressed flag, 4-byte big-endian length, the bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def infer_request(model: str, shape: tuple[int, ...], batch: int, seed: int = 0,
                  input_name: str = "input") -> vpb.ModelInferRequest:
    """A v2 ModelInfer of ``batch`` random FP32 images of ``shape`` (C, H, W)."""
    x = np.random.default_rng(seed).random((batch, *shape), dtype=np.float32)
    request = vpb.ModelInferRequest(model_name=model, id="h2load")
    request.inputs.add(name=input_name, datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def finished(target: Target) -> tuple[int, int, int]:
    """(successful, cancelled, otherwise failed) requests the server has counted so far, from /metrics."""
    with urllib.request.urlopen(target.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    counts = {"OK": 0, "CANCELLED": 0, "other": 0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples if family.name == target.counter else ():
            if sample.name == target.counter + "_total":
                code = sample.labels.get("code", "")
                counts[code if code in counts else "other"] += int(sample.value)
    return counts["OK"], counts["CANCELLED"], counts["other"]


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and every live descendant (worker processes included)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        proc = int(stat.parent.name)
        parents[proc] = int(fields[1])
        times[proc] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(times.get(p, 0.0) for p in tree)


def cpu_ticks() -> tuple[int, int, int]:
    """The machine's CPU ticks so far from /proc/stat: (busy, steal, total). Busy is user, nice, system,
    irq and softirq time; steal is what the hypervisor took; total adds idle and iowait."""
    fields = Path("/proc/stat").read_text().split()[1:9]
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields)
    busy = user + nice + system + irq + softirq
    return busy, steal, busy + steal + idle + iowait


def h2load_command(h2load: str, port: int, body: Path, concurrency: int, connections: int,
                   duration: float, log_file: Path | None, requests: int = 0) -> list[str]:
    """h2load keeping ``concurrency`` calls in flight over ``min(concurrency, connections)`` connections,
    for ``duration`` seconds or, when ``requests`` is set, until that many calls are answered."""
    clients = min(concurrency, connections)
    if concurrency % clients:
        raise ValueError(f"concurrency {concurrency} is not a multiple of {clients} connections")
    if requests and requests < concurrency:
        raise ValueError(f"{requests} requests cannot keep {concurrency} in flight")
    limit = ["-n", str(requests)] if requests else ["-D", f"{round(duration * 1000)}ms"]
    cmd = [h2load, *limit, "-c", str(clients), "-m", str(concurrency // clients),
           "-t", "1", "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    if log_file is not None:
        cmd += ["--log-file", str(log_file)]
    return [*cmd, f"http://127.0.0.1:{port}{PATH}"]


_RATE = re.compile(r"finished in [\d.]+m?s, ([\d.]+) req/s")
_SUCCEEDED = re.compile(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded")


def measure(h2load: str, target: Target, body: Path, batch: int, concurrency: int, connections: int,
            warmup: float, duration: float, work: Path, requests: int = 0) -> Sample:
    """One round for one server: an unmeasured warm-up, then a measured h2load run checked against the
    server's counter. Raises RuntimeError when h2load fails or the counts disagree.

    With ``requests``, the measured run is that many calls, timed to the last reply, and the warm-up is
    one call per stream: for requests of a second or more, where a timed window counts whole calls only
    (a call more or less moves a 15 s window's figure by several per cent) and cuts calls off at its end.
    """
    port = int(target.server.target.rsplit(":", 1)[1])
    if requests and warmup > 0:
        subprocess.run(h2load_command(h2load, port, body, concurrency, connections, 0, None, concurrency),
                       check=True, capture_output=True, timeout=600)
    elif warmup > 0:
        subprocess.run(h2load_command(h2load, port, body, concurrency, connections, warmup, None),
                       check=True, capture_output=True, timeout=warmup + 60)
    log_file = work / f"h2load-{time.monotonic_ns()}.log"
    before = finished(target)
    cpu0 = tree_cpu_seconds(target.server.pid)
    client0 = resource.getrusage(resource.RUSAGE_CHILDREN)  # finished children only: h2load once it ends
    busy0, _, total0 = cpu_ticks()
    t0 = time.monotonic()
    run = subprocess.run(h2load_command(h2load, port, body, concurrency, connections, duration, log_file,
                                        requests),
                         capture_output=True, text=True, timeout=duration + 60 if not requests else 3600)
    wall = time.monotonic() - t0
    cpu = tree_cpu_seconds(target.server.pid) - cpu0
    client1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy1, _, total1 = cpu_ticks()
    client = client1.ru_utime + client1.ru_stime - client0.ru_utime - client0.ru_stime
    ok, cancelled, failed = (a - b for a, b in zip(finished(target), before, strict=True))
    counts = _SUCCEEDED.search(run.stdout)
    if run.returncode != 0 or counts is None:
        raise RuntimeError(f"h2load against {target.name} failed ({run.returncode}): "
                           f"{run.stderr or run.stdout}")
    done, succeeded = int(counts.group(1)), int(counts.group(2))
    # A call still in flight when h2load's clock runs out is not counted by h2load; the server answers it
    # (OK) or sees it cancelled as h2load closes the connection: at most one per stream, at the end of the
    # measured run and, for requests longer than the gap between the two (big batches), of the warm-up.
    unseen = 0 if requests else concurrency * (2 if warmup > 0 else 1)
    if failed or done != succeeded or not succeeded <= ok <= ok + cancelled <= succeeded + unseen:
        raise RuntimeError(
            f"{target.name} C={concurrency}: h2load saw {succeeded} HTTP successes of {done} done, the "
            f"server counted {ok} OK, {cancelled} cancelled and {failed} failed; the round is not "
            "trustworthy"
        )
    rows = np.loadtxt(log_file, dtype=np.int64, ndmin=2)  # start µs since epoch, HTTP status, µs to reply
    latency_ms = rows[rows[:, 1] == 200][:, 2] / 1e3
    rate = float(_RATE.search(run.stdout).group(1))  # succeeded / h2load's measured duration
    return Sample(
        requests_per_s=rate,
        images_per_s=rate * batch,
        p50_ms=float(np.percentile(latency_ms, 50)),
        p99_ms=float(np.percentile(latency_ms, 99)),
        cpu_us_per_request=1e6 * cpu / max(1, ok),
        requests=ok,
        loadavg=os.getloadavg()[0],
        server_cores=cpu / wall,
        client_cores=client / wall,
        box_busy_cores=(os.cpu_count() or 1) * (busy1 - busy0) / max(1, total1 - total0),
    )


@contextlib.contextmanager
def start_convserve(name: str, flags: list[str], repository: Path, work: Path):
    port_file = work / f"{name}-{time.monotonic_ns()}.json"
    cmd = loopback_command(port_file, "--model-repository", str(repository), "--log-level", "WARNING",
                           *flags, http_port=-1)
    with _process(cmd, port_file, work / "servers.log") as server:
        port = json.loads(port_file.read_text())["metrics_port"]
        yield Target(name, server, f"http://127.0.0.1:{port}/metrics", "convserve_requests")


@contextlib.contextmanager
def start_baseline(name: str, model_file: Path, work: Path):
    port_file = work / f"{name}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "benchmarks.baseline_server", *BASELINES[name][0],
           "--model", str(model_file), "--port-file", str(port_file)]
    with _process(cmd, port_file, work / "servers.log") as server:
        port = json.loads(port_file.read_text())["metrics_port"]
        yield Target(name, server, f"http://127.0.0.1:{port}/metrics", "baseline_requests")


_FIGURES = tuple(f.name for f in fields(Sample))


def report(results: dict[tuple[str, int], list[Sample]], names: list[str], conc: list[int],
           reference: str) -> str:
    """The median table; ``x ref`` is the median over rounds of req/s over the reference's same round."""
    lines = [f"| server | C | req/s | img/s | p50 ms | p99 ms | server CPU µs/req | x {reference} | "
             "server cores | h2load cores | box busy | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in conc:
        for name in names:
            rs = results[(name, c)]
            med = {k: float(np.median([getattr(r, k) for r in rs])) for k in _FIGURES}
            ratio = "–"
            if (reference, c) in results and name != reference:
                ref = results[(reference, c)]
                x = np.median([r.requests_per_s / b.requests_per_s for r, b in zip(rs, ref, strict=True)])
                ratio = f"{x:.2f}"
            lines.append(f"| {name} | {c} | {med['requests_per_s']:,.0f} | {med['images_per_s']:,.0f} | "
                         f"{med['p50_ms']:.2f} | {med['p99_ms']:.2f} | {med['cpu_us_per_request']:,.0f} | "
                         f"{ratio} | {med['server_cores']:.2f} | {med['client_cores']:.2f} | "
                         f"{med['box_busy_cores']:.2f} | {med['loadavg']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[-3:]))
    p.add_argument("--convserve", action="append", default=[], metavar="NAME=FLAGS",
                   help='a convserve variant: a name and extra `convserve serve` flags '
                   '(default "convserve=")')
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help=f"comma-separated, of {', '.join(BASELINES)}; '' for none (default all)")
    p.add_argument("--reference", default="plain", help="the server every ratio is taken against")
    p.add_argument("-C", "--concurrency", default="1,8,32", help="calls in flight, comma-separated")
    p.add_argument("--connections", type=int, default=8,
                   help="HTTP/2 connections at most; each C must be a multiple of min(C, this)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=4.0, help="seconds measured per server per round")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds of load before each")
    p.add_argument("--requests", type=int, default=0,
                   help="measure this many calls per server per round, timed to the last reply, instead "
                   "of --duration seconds (with a warm-up of one call per stream when --warmup > 0); for "
                   "requests that take a second or more")
    p.add_argument("--model", choices=("lenet", "resnet"), default="lenet")
    p.add_argument("--batch", type=int, default=1, help="images per request")
    p.add_argument("--out", type=Path, default=models.REPO_ROOT / "bench_results" / "h2load.json")
    a = p.parse_args(argv)
    h2load = shutil.which("h2load")
    if h2load is None:
        p.error("h2load not found: install Debian's nghttp2-client (scripts/install_system_deps.sh)")
    try:
        conc = [int(c) for c in a.concurrency.split(",")]
        variants = [(v.partition("=")[0], shlex.split(v.partition("=")[2]))
                    for v in a.convserve or ["convserve="]]
        baselines = [b for b in a.baselines.split(",") if b]
        unknown = sorted(set(baselines) - set(BASELINES))
        if unknown:
            raise ValueError(f"unknown baseline(s) {', '.join(unknown)}; "
                             f"expected some of {', '.join(BASELINES)}")
        for c in conc:
            h2load_command(h2load, 0, Path(), c, a.connections, 1, None, a.requests)
    except ValueError as exc:
        p.error(str(exc))
    names = [n for n, _ in variants] + baselines
    per_round = len(names) * len(conc) * (a.warmup + a.duration + 0.5)  # (unknown ahead with --requests)
    args = sys.argv[1:] if argv is None else argv
    print(f"# {' '.join(['python -m benchmarks.h2load', *map(shlex.quote, args)])}")
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load average "
          f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())}; about {a.rounds * per_round / 60:.0f} min "
          f"of load after the servers start", flush=True)
    repository = models.REPO_ROOT / "bench_results" / "models"
    repository.mkdir(parents=True, exist_ok=True)
    model = models.RESNET if a.model == "resnet" else models.LENET
    (models.prepare_resnet if a.model == "resnet" else models.prepare_lenet)(repository)
    spec = load_config(repository / model).input
    shape = tuple(spec.shape)
    results: dict[tuple[str, int], list[Sample]] = {}
    ticks0 = cpu_ticks()
    with tempfile.TemporaryDirectory(prefix="convserve-h2load-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        body = work / "request.bin"
        request = infer_request(model, shape, a.batch, input_name=spec.name)
        body.write_bytes(frame(request.SerializeToString()))
        targets = [stack.enter_context(start_convserve(n, flags, repository, work)) for n, flags in variants]
        targets += [stack.enter_context(start_baseline(n, models.model_file(repository, model), work))
                    for n in baselines]
        for rnd in range(a.rounds):
            for c in conc:
                for t in targets if rnd % 2 == 0 else reversed(targets):
                    s = measure(h2load, t, body, a.batch, c, a.connections, a.warmup, a.duration, work,
                                a.requests)
                    results.setdefault((t.name, c), []).append(s)
                    print(f"round {rnd + 1} C={c:<3} {t.name:<14} {s.requests_per_s:8,.1f} req/s "
                          f"{s.images_per_s:8,.1f} img/s "
                          f"p50 {s.p50_ms:6.2f} p99 {s.p99_ms:6.2f} ms  "
                          f"cpu {s.cpu_us_per_request:5.0f} µs/req  cores: server {s.server_cores:.2f} "
                          f"h2load {s.client_cores:.2f} box {s.box_busy_cores:.2f}  load {s.loadavg:.1f}",
                          flush=True)
    ticks1 = cpu_ticks()
    print(f"\nmedians over {a.rounds} rounds: {a.model}, v2 ModelInfer, {a.batch} image(s) per request, "
          f"h2load over at most {a.connections} connections, "
          f"{f'{a.requests} calls' if a.requests else f'{a.duration:g} s'} per server per round; "
          f"load average at end {' / '.join(f'{x:.2f}' for x in os.getloadavg())}; the hypervisor took "
          f"{100 * (ticks1[1] - ticks0[1]) / max(1, ticks1[2] - ticks0[2]):.1f} % of the CPU time (steal)\n")
    print(report(results, names, conc, a.reference))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"argv": sys.argv, "rounds": {f"{n} C={c}": [asdict(s) for s in rs]
                                                             for (n, c), rs in results.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
