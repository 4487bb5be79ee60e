"""One command for the whole benchmark: ``python -m benchmarks.run [--quick]`` (``make bench``).

In one run, with every server up for the whole run and rounds interleaved (medians reported), it measures:
(a) an empty grpc.aio servicer (canned replies), (b) a plain server (one ``session.run`` per request and
nothing else), (b') grpc's sync thread-pool server running the model inline on the calling thread (the
strongest baseline built here; no target), (c) in-process ONNX Runtime, and (d) convserve (metrics on;
off; and on asyncio's loop instead of uvloop) — img/s, latency percentiles and the server's CPU µs per
request (from /proc, over the measured window) — plus a head-of-line check (three clients sending
16-megapixel PNGs against a small request and a health Check). It writes ``bench_results/bench.json``,
``bench.png`` and ``bench.md`` (also printed), with the issue's targets checked at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import grpc
import numpy as np

from convserve.common.model_config import load_config
from convserve.testing import loopback_command

from . import models
from .loadgen import Result, merge

log = logging.getLogger("benchmarks")

CONCURRENCY = (1, 8, 32)
SERVERS = ("empty", "plain", "sync", "convserve", "convserve-nometrics", "convserve-asyncio",
           "convserve-noinline")


@dataclass(frozen=True)
class Case:
    """One row: which server, model, API, request size and concurrency."""

    server: str  # one of SERVERS
    model: str
    api: str  # classify | v2 | stream
    batch: int
    concurrency: int
    version: int = 0  # 0: the latest ready version


@dataclass(frozen=True)
class Server:
    target: str  # host:port
    pid: int


@dataclass
class Row:
    case: Case
    summary: dict
    ceiling: float | None  # in-process img/s at the request's batch size (median over rounds)
    loadavg: float  # 1-minute load average when the row ran (median over rounds)
    rounds: list[dict]


def _median_summary(rounds: list[dict]) -> dict:
    """Per-key median over rounds; errors summed."""
    out: dict = {}
    for key in ("images_per_s", "requests_per_s", "p50_ms", "p90_ms", "p99_ms", "cpu_us_per_request"):
        out[key] = float(np.median([r.get(key, float("nan")) for r in rounds]))
    for key in ("requests", "images"):
        out[key] = int(sum(r[key] for r in rounds))
    errors: dict[str, int] = {}
    for r in rounds:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    out["errors"] = errors
    out["late_start"] = any(r["late_start"] for r in rounds)
    return out


# ---------------------------------------------------------------- processes


@contextlib.contextmanager
def _process(cmd: list[str], port_file: Path, log_path: Path, timeout: float = 180.0) -> Iterator[Server]:
    """Start a server subprocess, wait for its port file and gRPC readiness; yield it; stop it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=models.REPO_ROOT)
        try:
            deadline = time.monotonic() + timeout
            while not (port_file.is_file() and port_file.stat().st_size > 0):
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[2]} exited with {proc.returncode}; see {log_path}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{cmd[2]} wrote no port file in {timeout:.0f} s; see {log_path}")
                time.sleep(0.1)
            port = json.loads(port_file.read_text())["grpc_port"]
            target = f"127.0.0.1:{port}"
            _wait_serving(target, deadline)
            yield Server(target, proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _wait_serving(target: str, deadline: float) -> None:
    """Health SERVING where the server has health checking; otherwise a ready channel is enough."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=max(1.0, deadline - time.monotonic()))
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return
                raise
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.2)
    raise TimeoutError(f"{target} never reported SERVING")


ServerContext = contextlib.AbstractContextManager[Server]


def convserve_server(repository: Path, work: Path, variant: str) -> ServerContext:
    port_file = work / f"{variant}-{time.monotonic_ns()}.json"
    flags = ["--model-repository", str(repository), "--log-level", "WARNING"]
    if variant == "convserve-asyncio":
        flags += ["--event-loop", "asyncio"]
    if variant == "convserve-noinline":
        flags += ["--inline-inference-us", "0"]
    cmd = loopback_command(port_file, *flags, metrics_port=-1 if variant == "convserve-nometrics" else 0)
    return _process(cmd, port_file, work / "servers.log")


def baseline_server(mode: str, model_path: Path | None, work: Path) -> ServerContext:
    port_file = work / f"{mode}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "benchmarks.baseline_server", "--mode", mode, "--port-file", str(port_file)]
    if model_path is not None:
        cmd += ["--model", str(model_path)]
    return _process(cmd, port_file, work / "servers.log")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stall(server: Server, model: str, shape: tuple[int, ...], duration: float, work: Path) -> dict:
    """Three 16-megapixel senders against a small request and a health Check (benchmarks/stall.py)."""
    out = work / f"stall-{time.monotonic_ns()}.json"
    subprocess.run([sys.executable, "-m", "benchmarks.stall", "--target", server.target, "--model", model,
                    "--shape", ",".join(map(str, shape)), "--duration", str(duration), "--out", str(out)],
                   check=True, cwd=models.REPO_ROOT, timeout=duration + 120)
    return json.loads(out.read_text())


def ceiling(model_dir: Path, batches: list[int], duration: float, work: Path) -> dict[int, float]:
    out = work / f"ceiling-{model_dir.name}.json"
    subprocess.run([sys.executable, "-m", "benchmarks.ceiling", "--model-dir", str(model_dir), "--batches",
                    ",".join(map(str, batches)), "--duration", str(duration), "--out", str(out)],
                   check=True, cwd=models.REPO_ROOT, timeout=60 + 3 * duration * len(batches))
    return {int(k): v for k, v in json.loads(out.read_text()).items()}


def drive(server: Server, case: Case, shape: tuple[int, ...], warmup: float, duration: float, procs: int,
          work: Path) -> tuple[Result, float]:
    """Run the load generator in ``procs`` processes sharing the concurrency, all on one time window;
    return the merged result and the server's CPU seconds inside the measured window."""
    target = server.target
    procs = max(1, min(procs, case.concurrency))
    shares = [case.concurrency // procs + (1 if i < case.concurrency % procs else 0) for i in range(procs)]
    start_at = time.time() + 1.5 + 0.3 * procs  # room for every process to import grpc and connect
    runs = []
    for i, share in enumerate(shares):
        out = work / f"load-{time.monotonic_ns()}-{i}.json"
        cmd = [sys.executable, "-m", "benchmarks.loadgen", "--target", target, "--api", case.api,
               "--model", case.model, "--shape", ",".join(map(str, shape)), "--batch", str(case.batch),
               "--concurrency", str(share), "--version", str(case.version),
               "--warmup", str(warmup), "--duration", str(duration),
               "--start-at", str(start_at), "--out", str(out)]
        runs.append((subprocess.Popen(cmd, cwd=models.REPO_ROOT), out))
    # The server's CPU over exactly the measured window (the load generators' clocks share start_at).
    time.sleep(max(0.0, start_at + warmup - time.time()))
    cpu0 = cpu_seconds(server.pid)
    time.sleep(max(0.0, start_at + warmup + duration - time.time()))
    cpu = cpu_seconds(server.pid) - cpu0
    results = []
    for proc, out in runs:
        try:
            rc = proc.wait(timeout=warmup + duration + 180)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        if rc != 0:
            raise RuntimeError(f"load generator failed with exit code {rc} on {case}")
        results.append(Result(**json.loads(out.read_text())))
    return merge(results), cpu


# ---------------------------------------------------------------- plan


def plan(quick: bool, lenet: str, resnet: str | None, concurrency: tuple[int, ...]) -> list[Case]:
    """The issue's target cases, each beside the baselines it is judged against."""
    cases: list[Case] = []
    for c in concurrency:
        for api in ("classify", "v2"):
            cases += [Case(srv, lenet, api, 1, c) for srv in ("empty", "plain", "sync", "convserve")]
        if c > 1:
            cases.append(Case("convserve", lenet, "stream", 1, c))
    for c in (1, 32):  # each design choice measured against the same server without it
        cases += [Case(srv, lenet, "classify", 1, c)
                  for srv in ("convserve-nometrics", "convserve-asyncio", "convserve-noinline")]
    # batch-64 requests: at most 8 in flight keeps them inside the default 1024-image queue bound
    for c in (1, 4) if quick else (1, 4, 8):
        for api in ("classify", "v2"):
            cases += [Case("plain", lenet, api, 64, c), Case("convserve", lenet, api, 64, c)]
    if resnet is not None:
        for c in (1, 8):
            cases += [Case("convserve", resnet, "classify", 1, c), Case("plain", resnet, "classify", 1, c)]
    return cases


# ---------------------------------------------------------------- report


def table(rows: list[Row]) -> str:
    head = ("| model | server | api | img/req | C | img/s | p50 ms | p90 ms | p99 ms | server CPU µs/req "
            "| errors | in-process img/s (same batch) | served/in-process | load avg |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        c, s = r.case, r.summary
        errs = sum(s["errors"].values())
        ceil = f"{r.ceiling:,.0f}" if r.ceiling else "–"
        ratio = f"{s['images_per_s'] / r.ceiling:.0%}" if r.ceiling else "–"
        lines.append(f"| {c.model} | {c.server} | {c.api} | {c.batch} | {c.concurrency} | "
                     f"{s['images_per_s']:,.0f} | {s['p50_ms']:.2f} | {s['p90_ms']:.2f} | "
                     f"{s['p99_ms']:.2f} | {s['cpu_us_per_request']:,.0f} | {errs} | {ceil} | {ratio} | "
                     f"{r.loadavg:.1f} |")
    return "\n".join(lines)


def _find(rows: list[Row], **match) -> Row | None:
    for r in rows:
        if all(getattr(r.case, k) == v for k, v in match.items()):
            return r
    return None


def against_sync(rows: list[Row], lenet: str) -> list[str]:
    """convserve over the sync thread-pool server, row by row: issue #12 sets no target against it, but it
    is the strongest baseline built here, so the report shows where convserve stands against it."""
    out = []
    for api in ("classify", "v2"):
        for c in (1, 8, 32):
            ours, sync = (_find(rows, server=srv, model=lenet, api=api, batch=1, concurrency=c)
                          for srv in ("convserve", "sync"))
            if ours and sync and sync.summary["images_per_s"] and sync.summary["cpu_us_per_request"]:
                speed = ours.summary["images_per_s"] / sync.summary["images_per_s"]
                cpu = ours.summary["cpu_us_per_request"] / sync.summary["cpu_us_per_request"]
                out.append(f"- LeNet {api} C={c}: img/s {speed:.2f}x, server CPU/request {cpu:.2f}x")
    return out


def targets(rows: list[Row], lenet: str, resnet: str | None, ceilings: dict[str, dict[int, float]],
            stalls: list[dict]) -> list[dict]:
    """The issue's targets, each with the measured figure and met / missed (None: not measured)."""
    out = []

    def add(name: str, value: float | None, goal: str, met: Callable[[float], bool]) -> None:
        out.append({"target": name, "measured": value, "goal": goal,
                    "met": None if value is None else bool(met(value))})

    def get(server: str, model: str | None, api: str, c: int, key: str, batch: int = 1) -> float | None:
        r = _find(rows, server=server, model=model, api=api, batch=batch, concurrency=c)
        v = r.summary[key] if r else None
        return v if v and v == v else None  # drop 0 and NaN

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    for api in ("classify", "v2"):
        for c in (1, 8, 32):
            add(f"LeNet {api} C={c}: img/s vs plain (x)",
                ratio(get("convserve", lenet, api, c, "images_per_s"),
                      get("plain", lenet, api, c, "images_per_s")), ">= 1.2", lambda v: v >= 1.2)
            add(f"LeNet {api} C={c}: server CPU/request vs plain (x)",
                ratio(get("convserve", lenet, api, c, "cpu_us_per_request"),
                      get("plain", lenet, api, c, "cpu_us_per_request")), "<= 0.8", lambda v: v <= 0.8)
        add(f"LeNet {api} C=32: req/s vs empty servicer (x)",
            ratio(get("convserve", lenet, api, 32, "requests_per_s"),
                  get("empty", lenet, api, 32, "requests_per_s")), ">= 0.65 (aim 0.85)", lambda v: v >= 0.65)
        add(f"LeNet {api} C=1: p50 vs plain (x)",
            ratio(get("convserve", lenet, api, 1, "p50_ms"), get("plain", lenet, api, 1, "p50_ms")),
            "<= 1.0", lambda v: v <= 1.0)
        for c in (1, 4, 8):
            add(f"LeNet {api} batch-64 C={c}: img/s vs plain (x)",
                ratio(get("convserve", lenet, api, c, "images_per_s", 64),
                      get("plain", lenet, api, c, "images_per_s", 64)), ">= 1.0", lambda v: v >= 1.0)
    for c in (1, 8):
        served = get("convserve", resnet, "classify", c, "images_per_s")
        plain = get("plain", resnet, "classify", c, "images_per_s")
        add(f"ResNet-18 C={c}: img/s vs plain (x)", ratio(served, plain), ">= 1.0", lambda v: v >= 1.0)
        add(f"ResNet-18 C={c}: img/s vs in-process batch 1 (x)",
            ratio(served, ceilings.get(resnet or "", {}).get(1)), ">= 0.9", lambda v: v >= 0.9)
    for c in (8, 32):
        add(f"LeNet stream C={c}: img/s vs unary classify (x)",
            ratio(get("convserve", lenet, "stream", c, "images_per_s"),
                  get("convserve", lenet, "classify", c, "images_per_s")), ">= 1.5", lambda v: v >= 1.5)
    for c in (1, 32):
        on, off = (get(srv, lenet, "classify", c, "cpu_us_per_request")
                   for srv in ("convserve", "convserve-nometrics"))
        add(f"metrics on vs off, LeNet classify C={c}: extra server CPU/request",
            None if not (on and off) else on / off - 1, "<= 5%", lambda v: v <= 0.05)
    if stalls:
        small = float(np.median([s["small"]["p99_ms"] for s in stalls]))
        health = float(np.median([s["health"]["max_ms"] for s in stalls]))
        add("3 x 16-Mpx senders: small request p99 (ms)", small, "< 250 ms", lambda v: v < 250)
        add("3 x 16-Mpx senders: slowest health Check (ms)", health, "< 250 ms", lambda v: v < 250)
    return out


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_names = list(dict.fromkeys(r.case.model for r in rows))
    fig, axes = plt.subplots(len(model_names), 2, figsize=(12, 4.2 * len(model_names)), squeeze=False)
    for m, model in enumerate(model_names):
        series: dict[str, list[Row]] = {}
        for r in rows:
            if r.case.model == model:
                key = f"{r.case.server} {r.case.api}" + (f" x{r.case.batch}" if r.case.batch > 1 else "")
                series.setdefault(key, []).append(r)
        for key, rs in series.items():
            rs = sorted(rs, key=lambda r: r.case.concurrency)
            cs = [r.case.concurrency for r in rs]
            style = "--" if key.startswith(("plain", "empty", "sync")) else "-"
            axes[m][0].plot(cs, [r.summary["images_per_s"] for r in rs], style, marker="o", label=key)
            axes[m][1].plot(cs, [r.summary["p99_ms"] for r in rs], style, marker="o", label=key)
        ceil = {r.ceiling for r in rows if r.case.model == model and r.case.batch == 1 and r.ceiling}
        for c in ceil:
            axes[m][0].axhline(c, color="grey", linestyle=":", label="in-process batch 1")
        for ax, ylabel in zip(axes[m], ("images/s", "p99 latency (ms)"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("requests in flight (C)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{model}: {ylabel}")
            ax.grid(True, alpha=0.3)
        axes[m][0].set_yscale("log")  # batch-64 rows are an order of magnitude above single images
        axes[m][1].set_yscale("log")
        axes[m][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short rows, 2 rounds (a few minutes in all)")
    p.add_argument("--warmup", type=float, help="seconds of load before each row (default 2, quick 1)")
    p.add_argument("--duration", type=float, help="seconds measured per row (default 6, quick 2)")
    p.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="C values for unary rows")
    p.add_argument("--client-procs", type=int, default=1,
                   help="load-generator processes sharing each row's concurrency (the box has few cores)")
    p.add_argument("--no-resnet", action="store_true", help="skip the ResNet-18 rows")
    p.add_argument("--models", default="lenet,resnet", help="rows of: lenet, resnet or both")
    p.add_argument("--only", default="", help=f"comma-separated servers to run ({','.join(SERVERS)}); "
                                             "default all")
    p.add_argument("--apis", default="classify,v2,stream", help="comma-separated APIs to run; default all")
    p.add_argument("--no-stall", action="store_true", help="skip the 16-megapixel head-of-line check")
    p.add_argument("--repeat", type=int, help="rounds over all rows, medians reported (default 3, quick 2)")
    p.add_argument("--out", type=Path, default=models.REPO_ROOT / "bench_results")
    p.add_argument("--plot-only", action="store_true", help="redraw bench.png from the existing bench.json")
    a = p.parse_args(argv)
    if a.plot_only:
        data = json.loads((a.out / "bench.json").read_text())
        fields = set(Case.__dataclass_fields__)
        plot([Row(Case(**{k: v for k, v in r.items() if k in fields}), r, r["ceiling_images_per_s"],
                  r["loadavg_1m"], r["rounds"]) for r in data["rows"]], a.out / "bench.png")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    log.setLevel(logging.INFO)  # our progress lines, without the exporter's INFO chatter
    warmup = a.warmup if a.warmup is not None else (1.0 if a.quick else 2.0)
    duration = a.duration if a.duration is not None else (2.0 if a.quick else 6.0)
    a.repeat = a.repeat if a.repeat is not None else (2 if a.quick else 3)
    load_start = os.getloadavg()
    a.out.mkdir(parents=True, exist_ok=True)
    repository = a.out / "models"
    repository.mkdir(exist_ok=True)

    lenet_source = models.prepare_lenet(repository)
    log.info("LeNet: %s", lenet_source)
    resnet: str | None = None
    resnet_source = "skipped (--no-resnet)"
    if not a.no_resnet:
        try:
            resnet_source = models.prepare_resnet(repository)
            resnet = models.RESNET
        except Exception as exc:  # the rest of the benchmark still runs; the report says why
            resnet_source = f"unavailable: {type(exc).__name__}: {exc}"
        log.info("ResNet-18: %s", resnet_source)
    shapes = {m: load_config(repository / m).input.shape for m in filter(None, (models.LENET, resnet))}
    cases = plan(a.quick, models.LENET, resnet, tuple(int(c) for c in a.concurrency.split(",")))
    if a.only:
        keep = set(a.only.split(","))
        cases = [c for c in cases if c.server in keep]
    wanted = {{"lenet": models.LENET, "resnet": models.RESNET}[m] for m in a.models.split(",")}
    cases = [c for c in cases if c.model in wanted and c.api in a.apis.split(",")]
    shapes = {m: shape for m, shape in shapes.items() if any(c.model == m for c in cases)}

    servers = [srv for srv in SERVERS if any(c.server == srv for c in cases)]
    per_round: dict[Case, list[tuple[dict, float]]] = {c: [] for c in cases}
    ceiling_rounds: dict[str, list[dict[int, float]]] = {m: [] for m in shapes}
    with tempfile.TemporaryDirectory(prefix="convserve-bench-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        # Every server stays up for the whole run and the rounds interleave them, so a burst of load
        # from elsewhere on a shared machine hits all of them alike; medians over rounds are reported.
        targets_by: dict[tuple[str, str], Server] = {}
        stalls: list[dict] = []
        for srv in servers:
            if srv in ("plain", "sync"):
                for m in shapes:
                    if any(c.server == srv and c.model == m for c in cases):
                        targets_by[srv, m] = stack.enter_context(
                            baseline_server(srv, models.model_file(repository, m), work))
            else:
                started = stack.enter_context(
                    baseline_server("empty", None, work) if srv == "empty"
                    else convserve_server(repository, work, srv))
                for m in shapes:
                    targets_by[srv, m] = started
        for rnd in range(a.repeat):
            for m in shapes:
                extra = {1, 8, 32, 64} if m == models.LENET else {1, 8}
                batches = sorted({c.batch for c in cases if c.model == m} | extra)
                ceiling_rounds[m].append(ceiling(repository / m, batches, min(duration, 2.0), work))
                log.info("round %d: in-process %s img/s by batch %s", rnd + 1, m,
                         {b: round(v) for b, v in ceiling_rounds[m][-1].items()})
            for case in cases:
                load1 = os.getloadavg()[0]
                # ResNet-18 requests take tens of ms each: give its rows enough completions to count.
                seconds = duration if case.model == models.LENET else max(duration, 5.0)
                res, cpu = drive(targets_by[case.server, case.model], case, shapes[case.model], warmup,
                                 seconds, a.client_procs, work)
                sm = res.summary()
                sm["cpu_us_per_request"] = cpu / res.requests * 1e6 if res.requests else float("nan")
                per_round[case].append((sm, load1))
                log.info("round %d: %-19s %-14s %-8s b=%-3d C=%-3d %9.0f img/s p50 %.2f p99 %.2f ms "
                         "cpu %.0f us/req err %s (load %.1f)", rnd + 1, case.server, case.model, case.api,
                         case.batch, case.concurrency, sm["images_per_s"], sm["p50_ms"], sm["p99_ms"],
                         sm["cpu_us_per_request"], sm["errors"] or 0, load1)
            if not a.no_stall and ("convserve", models.LENET) in targets_by:
                stalls.append(stall(targets_by["convserve", models.LENET], models.LENET, shapes[models.LENET],
                                    max(duration, 4.0), work))
                log.info("round %d: stall check %s", rnd + 1, stalls[-1])
        stack.close()
        if (work / "servers.log").is_file():
            (a.out / "servers.log").write_text((work / "servers.log").read_text(errors="replace"))

    ceilings = {m: {b: float(np.median([r[b] for r in rs])) for b in rs[0]}
                for m, rs in ceiling_rounds.items()}
    rows = [Row(c, _median_summary([sm for sm, _ in rs]), ceilings[c.model].get(c.batch),
                float(np.median([ld for _, ld in rs])), [sm for sm, _ in rs])
            for c, rs in per_round.items()]
    rows.sort(key=lambda r: (r.case.model != models.LENET, r.case.model, r.case.api, r.case.batch,
                             r.case.server, r.case.concurrency))
    checked = targets(rows, models.LENET, resnet, ceilings, stalls)
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "warmup_s": warmup, "duration_s": duration, "rounds": a.repeat, "client_procs": a.client_procs,
        "lenet": lenet_source, "resnet": resnet_source,
        "loadavg_start_end": [load_start, os.getloadavg()],
    }
    md = table(rows)
    verdict = {True: "MET", False: "MISSED", None: "not measured"}
    tgt = "\n".join(f"- {t['target']}: {_fmt(t['measured'], t['target'])} (goal {t['goal']}) "
                    f"{verdict[t['met']]}" for t in checked)
    loads = ", ".join(f"{v:.1f}" for v in (*load_start, *os.getloadavg()))
    stall_line = "; ".join(f"small p99 {s['small']['p99_ms']:.1f} ms, health max "
                           f"{s['health']['max_ms']:.1f} ms, {s['big_requests']} big requests, "
                           f"errors {s['errors'] or 0}" for s in stalls)
    text = (f"convserve benchmark, {meta['date']}, {meta['machine']}\n{meta['command']}\n"
            f"load average (1/5/15 min) at start, end: {loads}\n\n{md}\n\n"
            f"head-of-line check (3 x 16-Mpx PNG senders), per round: {stall_line or 'not run'}\n\n"
            f"in-process ceilings (img/s by batch): "
            f"{ {m: {b: round(v) for b, v in c.items()} for m, c in ceilings.items()} }\n\nTargets:\n{tgt}\n")
    if sync_lines := against_sync(rows, models.LENET):
        text += ("\nconvserve against the sync thread-pool server (no target; the strongest baseline "
                 "built here):\n" + "\n".join(sync_lines) + "\n")
    print(text)
    (a.out / "bench.md").write_text(text)
    (a.out / "bench.json").write_text(json.dumps({
        "meta": meta,
        "ceilings": {m: {str(b): v for b, v in c.items()} for m, c in ceilings.items()},
        "ceiling_rounds": {m: [{str(b): v for b, v in c.items()} for c in rs]
                           for m, rs in ceiling_rounds.items()},
        "rows": [{**asdict(r.case), **r.summary, "ceiling_images_per_s": r.ceiling, "loadavg_1m": r.loadavg,
                  "rounds": r.rounds} for r in rows],
        "targets": checked,
        "stall_rounds": stalls,
    }, indent=1))
    plot(rows, a.out / "bench.png")
    log.info("wrote %s, %s and %s", a.out / "bench.md", a.out / "bench.json", a.out / "bench.png")
    return 0


def _fmt(value: float | None, name: str) -> str:
    if value is None:
        return "–"
    if "(x)" in name:
        return f"{value:.2f}x"
    if "(ms)" in name:
        return f"{value:.1f} ms"
    return f"{value:.1%}"


if __name__ == "__main__":
    sys.exit(main())
