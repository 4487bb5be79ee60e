"""Build the grpc.aio server (services, edge, health, reflection, metrics), start it, drain and stop it.

``start_server(settings)`` is the one factory: production passes ports 8001/8002, tests pass 0 and
read the ports it returns.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from .core.control import ControlPlane
from .core.inference import InferenceCore
from .grpc import classify, inference_v2
from .grpc.auth import TokenAuthInterceptor
from .grpc.edge import Edge
from .health import Health
from .observability import logs
from .observability.metrics import Metrics
from .observability.triton_metrics import TritonCollector
from .processes.cores import usable_cores
from .processes.memory import HeapTrimmer
from .processes.sockets import shut_down_port
from .repository.model_repository import ModelRepository, RepositoryUnavailableError, check_root
from .rest import HttpFrontEnd, start_http
from .settings import Settings
from .tokens import read_tokens

log = logging.getLogger("convserve.server")

SERVICE_NAMES = (classify.SERVICE.full_name, inference_v2.SERVICE.full_name)

# How long a thread may hold the GIL while another waits for it (CPython's default is 5 ms). A batcher
# worker returning from ONNX Runtime must re-take the GIL from the event-loop thread, which is busy with
# gRPC under load: at 5 ms every finished batch can sit that long before its replies go out. 0.5 ms
# measured +20-30 % LeNet Classify throughput at C=32 and a lower p99 (docs/performance.md). Set for the
# serving process only (``serve_forever``), not for in-process servers in tests or embedding code.
GIL_SWITCH_INTERVAL_S = 0.0005


@dataclass
class RunningServer:
    """A started server and everything it owns; ``stop(grace)`` drains it."""

    server: grpc.aio.Server
    settings: Settings
    repository: ModelRepository
    metrics: Metrics
    health: Health
    edge: Edge
    core: InferenceCore
    grpc_port: int
    metrics_port: int | None
    http: HttpFrontEnd | None = None  # the v2 REST front end, unless --http-port -1
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: bool = False
    _poller: asyncio.Task[None] | None = None  # repository polling (hot reload), when configured
    _trimmer: HeapTrimmer | None = None  # returns freed heap to the OS after large messages
    _unix_path: str | None = None  # a worker's private gRPC socket, drained like the port

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    @property
    def address(self) -> str:
        """host:port a client on this machine can dial (the wildcard host becomes loopback)."""
        host = self.settings.host
        if host in ("0.0.0.0", "", "::", "[::]"):
            host = "127.0.0.1"
        return f"[{host}]:{self.grpc_port}" if ":" in host else f"{host}:{self.grpc_port}"

    async def refresh_readiness(self) -> None:
        """Health follows the models: with strict readiness (the default) SERVING only while every model
        found is ready, else while any version is."""
        await self.health.set_ready(self.repository.ready(self.settings.strict_readiness))

    async def load_models(self) -> None:
        """Load every model; report SERVING as ``refresh_readiness`` decides."""
        t0 = time.perf_counter()
        await self.repository.load_all()
        ready = [
            f"{sm.name}:{sm.version}"
            for e in self.repository.entries()
            for sm in e.versions.values()
            if sm.ready
        ]
        failed = self.repository.not_ready()
        if self.settings.strict_readiness and failed:
            log.error(
                "strict readiness: health stays NOT_SERVING while %d model(s) are not ready: %s "
                "(--no-strict-readiness serves the ready ones)",
                len(failed),
                "; ".join(failed),
            )
        elif not ready:
            log.error("no model version is ready in %s; health stays NOT_SERVING", self.repository.root)
        else:
            # A worker's health also waits for its siblings (the supervisor's gate): ready, not yet serving.
            log.info(
                "%s %d model version(s) [%s] after %.2f s",
                "serving" if self.health.serving else "ready, serving once every worker is:",
                len(ready),
                ", ".join(ready),
                time.perf_counter() - t0,
            )

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING and new calls refused (UNAVAILABLE) at once; in-flight calls get up to
        ``grace`` seconds (default: the drain_grace_seconds setting); then everything is released."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.settings.drain_grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        await self.health.drain()
        if self._poller is not None:
            self._poller.cancel()
        log.info("draining: %d call(s) in flight, grace %.1f s", self.edge.in_flight, grace)
        finished = await self.edge.wait_idle(grace)
        if not finished:
            log.warning(
                "grace period over with %d call(s) still in flight; cancelling them", self.edge.in_flight
            )
        if self.http is not None:
            await self.http.stop(deadline)
        await _replies_sent(deadline)
        # Every call we were handed has finished (or the grace is over); what is left on the connections
        # are calls grpc core holds unhanded, and new ones: end the connections under core so that their
        # clients see UNAVAILABLE, before core's own shutdown answers them CANCELLED (processes/sockets.py).
        shut_down_port(self.grpc_port, self._unix_path)
        await self.server.stop(max(0.0, deadline - time.monotonic()))
        await self.repository.stop(max(0.0, deadline - time.monotonic()))
        self.core.close()
        self.metrics.stop()
        if self._trimmer is not None:
            self._trimmer.stop()
        logs.flush_suppressed()  # the count of failure lines the rate limit held back
        self._stopped.set()
        log.info("stopped")


# grpc.aio runs each call in a task it names "HandleExceptions[<method>]"; the task ends once the reply and
# status were handed to the transport, which is after our edge wrapper has returned (and counted the call
# done). Read by name: with another grpc that names them otherwise the wait below finds none and is skipped.
_GRPC_CALL_TASK = "HandleExceptions["
# Longest wait for replies already produced to be sent before the sockets are shut down (within the grace).
_SEND_WAIT_S = 1.0


async def _replies_sent(deadline: float) -> None:
    """Wait until grpc has sent the replies of the calls it is finishing now (bounded by ``deadline`` and
    ``_SEND_WAIT_S``): the sockets shut down next, and a reply still in grpc's hands would be lost with
    them (its client would see UNAVAILABLE for a call that ran)."""
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me and t.get_name().startswith(_GRPC_CALL_TASK)]
    timeout = min(_SEND_WAIT_S, deadline - time.monotonic())
    if tasks and timeout > 0:
        await asyncio.wait(tasks, timeout=timeout)


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_enabled:
        return None
    key = Path(settings.tls_key).read_bytes()
    cert = Path(settings.tls_cert).read_bytes()
    ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


async def start_server(
    settings: Settings,
    registry: CollectorRegistry | None = None,
    *,
    load_models: bool = True,
    share_ports: bool = False,
    private_address: str | None = None,
) -> RunningServer:
    """Bind and start the gRPC server (and /metrics), then load the models unless ``load_models`` is False.

    Health reads NOT_SERVING from the moment the port is open until models are loaded, so a caller
    that wants the port early (``serve_forever`` writes the port file) passes False and calls
    ``RunningServer.load_models()`` itself. Raises OSError/RuntimeError if a port cannot be bound.
    A worker process passes ``share_ports`` (bind the gRPC and REST ports with SO_REUSEPORT beside its
    siblings) and ``private_address`` (one more gRPC address that reaches this process alone).
    """
    metrics = Metrics(registry, enabled=settings.metrics_enabled or registry is not None)
    repository = ModelRepository(settings.model_repository, settings, metrics)
    if not settings.wait_for_repository:
        repository.check_root()
    if metrics.enabled and settings.triton_metrics:
        metrics.registry.register(TritonCollector(repository))
    repository.scan()
    health = Health(SERVICE_NAMES)
    await health.start()
    trimmer = HeapTrimmer()
    edge = Edge(health, on_message=trimmer.note)

    interceptors = []
    tokens = (
        *(read_tokens(settings.auth_token_file) if settings.auth_token_file else ()),
        *(t.encode() for t in settings.auth_tokens),
    )
    if tokens:
        interceptors.append(TokenAuthInterceptor(tokens))
    size = settings.max_message_bytes
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            # A busy port must fail loudly, not be shared with another server; worker processes share
            # theirs, which their supervisor has reserved (server/processes/supervisor.py).
            ("grpc.so_reuseport", 1 if share_ports else 0),
        ],
    )
    core = InferenceCore(repository, settings, metrics)
    control = ControlPlane(repository, settings, health)
    classifier = classify.ClassifierService(repository, settings, metrics, health, core)
    v2 = inference_v2.InferenceService(repository, settings, metrics, health, core, control)
    edge.register(server, classifier, classify.SERVICE)
    edge.register(server, v2, inference_v2.SERVICE, probes=inference_v2.PROBES)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )

    address = _bind_address(settings.host, settings.grpc_port)
    credentials = _credentials(settings)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind gRPC to {address}")
    if private_address is not None and server.add_insecure_port(private_address) == 0:
        raise RuntimeError(f"could not bind gRPC to {private_address}")
    await server.start()
    metrics_port = None
    http = None
    try:
        if settings.http_enabled:
            http = await start_http(
                settings, control=control, core=core, edge=edge, tokens=tokens, reuse_port=share_ports
            )
        if settings.metrics_enabled:
            metrics_port = metrics.start_http_server(
                settings.metrics_host or settings.host, settings.metrics_port
            )
    except BaseException:
        if http is not None:
            await http.stop()
        await server.stop(0)
        core.close()
        raise
    running = RunningServer(
        server, settings, repository, metrics, health, edge, core, port, metrics_port, http
    )
    running._trimmer = trimmer
    if private_address is not None and private_address.startswith("unix:"):
        running._unix_path = private_address.removeprefix("unix:")
    repository.on_change = running.refresh_readiness
    trimmer.start()
    if settings.repository_poll_seconds > 0:
        running._poller = asyncio.create_task(repository.poll_forever(settings.repository_poll_seconds))
    scheme = "https" if credentials else "http"
    log.info(
        "gRPC listening on %s%s; REST %s; metrics %s",
        _bind_address(settings.host, port),
        " (TLS" + (", mTLS" if settings.tls_client_ca else "") + ")" if credentials else "",
        f"{scheme}://{_bind_address(settings.host, http.port)}/v2" if http else "off",
        f"http://{settings.metrics_host or settings.host}:{metrics_port}/metrics" if metrics_port else "off",
    )
    if load_models:
        await running.load_models()
    return running


def check_port_file(path: str | Path) -> None:
    """Raise ValueError when ``path`` exists and is not a regular file (a device, folder, FIFO, socket or
    symlink): the port file replaces what is there, and a server run as root must not replace those."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise ValueError(f"port file {path} exists and is not a regular file; refusing to replace it")


def write_port_file(
    path: str | Path,
    grpc_port: int,
    metrics_port: int | None,
    http_port: int | None = None,
    *,
    workers: list[dict[str, Any]] | None = None,
) -> None:
    """Write the bound ports as JSON, atomically, so a reader never sees half a file. A supervisor adds
    ``workers``: each worker's index, pid and the gRPC address that reaches it alone.

    The temporary file is created exclusively (``mkstemp``: never through a planted symlink) beside
    ``path`` and renamed over it. Raises ValueError for an existing non-regular ``path``.
    """
    path = Path(path)
    check_port_file(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            ports = {"grpc_port": grpc_port, "http_port": http_port, "metrics_port": metrics_port}
            extra = {} if workers is None else {"workers": workers}
            out.write(json.dumps({**ports, "pid": os.getpid(), **extra}))
            out.write("\n")
        os.chmod(tmp, 0o644)
        check_port_file(path)  # narrows the window between the first check and the rename
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


async def _serve(settings: Settings) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if settings.port_file:
            check_port_file(settings.port_file)
        running = await start_server(settings, load_models=False)
    except (OSError, ValueError, RuntimeError) as exc:  # busy port, unreadable TLS/token file, ...
        log.error("cannot start the server: %s", exc)
        return 1
    if settings.port_file:
        try:
            write_port_file(
                settings.port_file, running.grpc_port, running.metrics_port, running.http_port
            )
        except (OSError, ValueError) as exc:
            log.error("cannot write the port file: %s", exc)
            await running.stop(0)
            return 1
    loader = asyncio.create_task(running.load_models())
    loader.add_done_callback(lambda _: _freeze_startup_objects())
    await stop.wait()
    log.info("shutdown signal received")
    if not loader.done():
        loader.cancel()
    await running.stop(settings.drain_grace_seconds)
    return 0


def _freeze_startup_objects() -> None:
    """Move everything alive once the models are loaded (modules, sessions, protobuf descriptors: ~45k
    objects) out of the cyclic GC's reach. They live as long as the process, yet each full collection
    walked them all on the event loop (measured: 26 ms per collection on a busy 2-core box, every RPC
    stalled meanwhile); afterwards a full collection only walks what requests left behind."""
    gc.collect()
    gc.freeze()


def serve_forever(settings: Settings) -> int:
    """Run the server until SIGTERM/SIGINT, drain within the grace period, and return exit status 0
    (1 when it cannot start: a busy port, an unreadable certificate or token file). With more than one
    worker (``workers``; 0 = one per usable core) this process supervises that many serving processes."""
    # JSON logs mean every line: native libraries' stderr goes through the logger too.
    stream = logs.route_native_logs(settings.log_level) if settings.log_format == "json" else None
    logs.configure_logging(settings.log_level, settings.log_format, settings.access_log, stream)
    workers = settings.workers or usable_cores()
    if workers > 1:
        from .processes.supervisor import supervise

        # Checked once here, so a missing repository is one error line, not one per worker.
        if not settings.wait_for_repository:
            try:
                check_root(settings.model_repository)
            except RepositoryUnavailableError as exc:
                log.error("cannot start the server: %s", exc)
                return 1

        return asyncio.run(supervise(settings, workers))
    return run_event_loop(settings, _serve(settings))


def run_event_loop(settings: Settings, main: Coroutine[Any, Any, int]) -> int:
    """Run a serving process's main coroutine on the configured event loop; returns its exit status."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    if settings.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:  # not installed (e.g. Windows): asyncio's loop serves the same, a little slower
            log.warning("uvloop is not installed; serving on asyncio's event loop")
        else:
            return uvloop.run(main)
    return asyncio.run(main)
