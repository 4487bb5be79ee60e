"""The supervisor of N serving processes sharing the ports: start them, replace one that dies, drain them
all on SIGTERM, and serve the one /metrics that sums theirs (docs/DESIGN.md, "Worker processes").

Each worker is a full convserve server (``worker.py`` here) binding the same gRPC and REST ports with
SO_REUSEPORT; the kernel spreads connections (not requests) over them. The supervisor reserves each port
first with a socket bound (never listening) with SO_REUSEPORT, and holds it for its whole life: with
``--grpc-port 0`` every worker gets the same real port without a probe-then-bind race, and a replacement
worker finds the port still theirs. It serves no request itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..app import check_port_file, write_port_file
from ..observability.metrics_sum import MetricsSum
from ..settings import Settings
from .cores import usable_cores
from .worker import WorkerPlan, control_call, control_path, grpc_address, write_plan

log = logging.getLogger("convserve.supervisor")

__all__ = ["reserve_port", "supervise", "worker_settings"]

# A worker that dies this many times in a row before it is ready again stops the server (a crash loop).
RESTART_LIMIT = 3
# Longest a worker may take from start to loaded models; past it the worker counts as failed.
START_TIMEOUT_S = 600.0
# How often a starting worker's state is read while it loads.
_STATE_POLL_S = 0.05
# How often the workers' metrics are read between scrapes: bounds what a `kill -9` takes from the totals.
METRICS_REFRESH_S = 5.0
_SCRAPE_TIMEOUT_S = 5.0
# After the drain grace, how long the workers get to release everything and exit before SIGKILL.
_EXIT_MARGIN_S = 10.0


def reserve_port(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with SO_REUSEPORT and not listening: it owns the port number
    (0 = an ephemeral one) without taking connections. Raises OSError when another server holds it."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    if port:
        # A server already listening there without SO_REUSEPORT would only be caught by the workers'
        # bind; one with it would silently share. Both fail here first, as a single process would.
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def worker_settings(settings: Settings, workers: int, cores: int, grpc_port: int, http_port: int) -> Settings:
    """Every worker's Settings: the reserved ports, no port file or /metrics port of its own, and ONNX
    Runtime and decode threads split so that workers × threads never exceed the cores (unless set)."""
    share = max(1, cores // workers)
    return settings.replace(
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=-1,
        port_file="",
        workers=1,
        intra_op_threads=settings.intra_op_threads or share,
        cpu_workers=settings.cpu_workers or share,
    )


@dataclass
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False
    generation: int = 0  # which process this index is on: a late scrape of a dead one is dropped


class Supervisor:
    """Runs ``workers`` serving processes from one private run folder until told to stop."""

    def __init__(self, settings: Settings, workers: int, run_dir: Path, ports: tuple[int, int]) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.grpc_port, self.http_port = ports
        self.workers = [_Worker(i) for i in range(workers)]
        self.sum = MetricsSum()
        self.restarts = 0
        self.metrics_port: int | None = None
        self._stopping = False
        self._started = asyncio.Event()  # every worker ready once
        self._failed = asyncio.Event()  # a worker cannot start: the server stops, exit 1
        self._gate_lock = asyncio.Lock()

    # ---- workers -------------------------------------------------------------------------------------

    async def _spawn(self, w: _Worker) -> asyncio.subprocess.Process:
        control_path(self.run_dir, w.index).unlink(missing_ok=True)
        w.generation += 1
        w.proc = proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "convserve.server.processes.worker", str(self.run_dir), str(w.index)
        )
        log.info("worker %d started (pid %d)", w.index, proc.pid)
        if self._stopping:  # the stop began while it was being started: it drains with the others
            proc.send_signal(signal.SIGTERM)
        return proc

    async def _wait_loaded(self, w: _Worker, proc: asyncio.subprocess.Process) -> bool:
        """Until the worker has loaded its models (True), or exited or timed out (False)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while proc.returncode is None and time.monotonic() < deadline:
            try:
                state = await control_call(control_path(self.run_dir, w.index), "GET", "/state")
                if state["loaded"]:
                    return True
            except (OSError, RuntimeError, asyncio.TimeoutError, ValueError):
                pass  # its control socket is not up yet
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), _STATE_POLL_S)
        return False

    async def _keep(self, w: _Worker) -> None:
        """Run worker ``w``, replacing it whenever it dies, until the supervisor stops."""
        failures = 0
        while not self._stopping:
            proc = await self._spawn(w)
            loaded = await self._wait_loaded(w, proc)
            if loaded and not self._stopping:
                failures = 0
                w.ready = True
                await self._update_gates()
            elif not self._stopping:
                log.error("worker %d (pid %d) did not become ready", w.index, proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            code = await proc.wait()
            w.ready = False
            self.sum.retire(w.index)
            if self._stopping:
                return
            self.restarts += 1
            failures += 0 if loaded else 1
            if not self._started.is_set() or failures >= RESTART_LIMIT:
                log.error("worker %d exited with %d before serving; stopping the server", w.index, code)
                self._failed.set()
                return
            log.warning("worker %d (pid %d) exited with %d; starting a replacement", w.index, proc.pid, code)
            await self._update_gates()

    async def _update_gates(self) -> None:
        """Readiness is the conjunction: every worker reads SERVING only while all are ready."""
        async with self._gate_lock:
            everyone = all(w.ready for w in self.workers)
            for w in self.workers:
                if w.ready:
                    with contextlib.suppress(OSError, RuntimeError, asyncio.TimeoutError):
                        await control_call(
                            control_path(self.run_dir, w.index), "POST", "/gate", {"open": everyone}
                        )
            if everyone and not self._stopping:
                if not self._started.is_set():
                    log.info("all %d workers serving", len(self.workers))
                self._started.set()
                self._write_port_file()

    def _write_port_file(self) -> None:
        if not self.settings.port_file:
            return
        workers = [
            {"index": w.index, "pid": w.proc.pid, "grpc": grpc_address(self.run_dir, w.index)}
            for w in self.workers
            if w.proc is not None
        ]
        try:
            write_port_file(
                self.settings.port_file,
                self.grpc_port,
                self.metrics_port,
                self.http_port if self.http_port >= 0 else None,
                workers=workers,
            )
        except (OSError, ValueError) as exc:
            log.error("cannot write the port file: %s", exc)
            self._failed.set()

    async def stop(self, tasks: Iterable[asyncio.Task[None]]) -> int:
        """SIGTERM every worker (each drains within the grace period), wait for all, then the tasks."""
        self._stopping = True
        live = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        limit = self.settings.drain_grace_seconds + _EXIT_MARGIN_S
        try:
            codes = await asyncio.wait_for(asyncio.gather(*(p.wait() for p in live)), limit)
        except asyncio.TimeoutError:
            log.error("workers still running %.0f s after SIGTERM; killing them", limit)
            for proc in live:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            codes = [1]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return 0 if all(c == 0 for c in codes) else 1

    # ---- metrics -------------------------------------------------------------------------------------

    async def refresh_metrics(self) -> None:
        """Read every ready worker's exposition into the sum (one that fails keeps its last reading)."""

        async def read(w: _Worker) -> None:
            generation = w.generation
            try:
                text = await control_call(
                    control_path(self.run_dir, w.index), "GET", "/metrics", timeout=_SCRAPE_TIMEOUT_S
                )
            except (OSError, RuntimeError, asyncio.TimeoutError):
                return
            if w.generation == generation and w.ready:
                self.sum.update(w.index, text)

        await asyncio.gather(*(read(w) for w in self.workers if w.ready))

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(METRICS_REFRESH_S)
            await self.refresh_metrics()

    def collect(self) -> Iterable[Metric]:
        """The workers' summed families, then the supervisor's own."""
        yield from self.sum.collect()
        yield GaugeMetricFamily(
            "convserve_workers", "Worker processes ready to serve.", value=sum(w.ready for w in self.workers)
        )
        yield CounterMetricFamily(
            "convserve_worker_restarts",
            "Worker processes that exited and were replaced.",
            value=self.restarts,
        )

    async def start_metrics(self) -> web.AppRunner:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)

        async def metrics(request: web.Request) -> web.Response:
            await self.refresh_metrics()
            return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def elsewhere(request: web.Request) -> web.Response:
            return web.Response(
                status=404,
                text="not found: this port serves only /metrics (the v2 REST API has its own port)\n",
            )

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_route("*", "/{tail:.*}", elsewhere)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host = self.settings.metrics_host or self.settings.host
        try:
            await web.TCPSite(runner, host, self.settings.metrics_port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self.metrics_port = int(runner.addresses[0][1])
        return runner


async def supervise(settings: Settings, workers: int) -> int:
    """Serve with ``workers`` processes until SIGTERM/SIGINT; 0 after a clean drain, 1 when the server
    cannot start (a busy port, a worker that fails before serving, a crash loop)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reserved: list[socket.socket] = []
    run_dir = Path(tempfile.mkdtemp(prefix="convserve-workers-"))  # mode 0700: sockets and tokens inside
    metrics_runner: web.AppRunner | None = None
    try:
        if settings.port_file:
            check_port_file(settings.port_file)
        reserved.append(reserve_port(settings.host, settings.grpc_port))
        grpc_port = reserved[-1].getsockname()[1]
        http_port = -1
        if settings.http_enabled:
            reserved.append(reserve_port(settings.host, settings.http_port))
            http_port = reserved[-1].getsockname()[1]
        cores = usable_cores()
        plan = WorkerPlan(
            worker_settings(settings, workers, cores, grpc_port, http_port),
            workers,
            settings.metrics_enabled,
            # Expensive models' runs take every core, one at a time (runtime/core_share.py), unless the
            # user set the threads.
            share_cores=cores if settings.intra_op_threads == 0 and cores > 1 else 0,
        )
        write_plan(run_dir, plan)
        sup = Supervisor(settings, workers, run_dir, (grpc_port, http_port))
        if settings.metrics_enabled:
            metrics_runner = await sup.start_metrics()
    except (OSError, ValueError) as exc:
        log.error("cannot start the server: %s", exc)
        _clean(reserved, run_dir)
        return 1
    log.info(
        "supervising %d workers on gRPC port %d, REST %s, metrics %s (%d usable cores, %d ONNX Runtime "
        "thread(s) per worker%s)",
        workers, grpc_port, http_port if http_port >= 0 else "off", sup.metrics_port or "off", cores,
        plan.settings.intra_op_threads,
        f"; expensive models: {plan.share_cores}, one run at a time" if plan.share_cores else "",
    )  # fmt: skip
    tasks = [asyncio.create_task(sup._keep(w)) for w in sup.workers]
    if settings.metrics_enabled:
        tasks.append(asyncio.create_task(sup._refresh_forever()))
    stopped = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(sup._failed.wait())
    await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
    log.info("shutdown signal received" if stop.is_set() else "a worker cannot serve; shutting down")
    code = await sup.stop(tasks)
    for t in (stopped, failed):
        t.cancel()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    _clean(reserved, run_dir)
    log.info("stopped")
    return 1 if sup._failed.is_set() else code


def _clean(reserved: list[socket.socket], run_dir: Path) -> None:
    for sock in reserved:
        sock.close()
    shutil.rmtree(run_dir, ignore_errors=True)
