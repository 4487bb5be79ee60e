"""The convserve metrics facade: which label values are allowed, the lifecycle gauges, the /metrics endpoint.

The per-request families (requests, images, failures, the duration, stage and batch-size histograms,
in-flight, queue depth) are plain counts per (model, version) in `metric_counts.SeriesCounts`, recorded by
each version's ``ModelStats`` under the lock it takes anyway and turned into Prometheus families by one
collector when /metrics is read (`metric_counts` has their buckets and why). The lifecycle families
(model_state, model_info, build_info, start_time) change only when a model loads or the process starts and
stay ordinary prometheus_client gauges.

Label values never come from a client unchecked: a (model, version) pair becomes a label only once the
repository has announced it through `set_model_state` (or `register_model`); anything else is recorded
under model="" / version="" so that a flood of made-up model names cannot create new time series.
`api` is one of `API_NAMES`, `code` a gRPC status name, and `reason` a domain error's fixed reason string.

Recording a request costs dict and list additions under one lock (≈1 µs on top of the Triton counters in
`benchmarks/metrics_cost.py`). `Metrics(enabled=False)` registers no collector and records nothing: the
request path does no Prometheus work at all, which is what the metrics-off benchmark runs.
"""

from __future__ import annotations

import platform
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)

from .metric_counts import (
    API_NAMES,
    BATCH_SIZE_BUCKETS,
    LATENCY_BUCKETS,
    STAGES,
    CountsCollector,
    SeriesCounts,
    observe,
)

__all__ = [
    "API_NAMES",
    "BATCH_SIZE_BUCKETS",
    "LATENCY_BUCKETS",
    "MODEL_STATES",
    "STAGES",
    "Metrics",
    "ModelObserver",
    "RequestHandle",
    "process_registry",
]

MODEL_STATES: tuple[str, ...] = ("loading", "ready", "failed", "unloading")
_CODES = frozenset(code.name for code in grpc.StatusCode)
_UNKNOWN_API = "other"

# `_created` samples would double the series count for no dashboard use; this process is convserve's own.
prometheus_client.disable_created_metrics()

_MV = ("model", "version")


class RequestHandle:
    """The object `Metrics.request` yields: set `.code` to the gRPC status name the call ends with."""

    __slots__ = ("_counts", "_start", "api", "code")

    def __init__(self, counts: SeriesCounts, api: str) -> None:
        self._counts = counts
        self.api = api
        self.code = "OK"

    def __enter__(self) -> RequestHandle:
        with self._counts.lock:
            self._counts.start(self.api)
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        elapsed = time.perf_counter() - self._start
        code = self.code
        if exc is not None and code == "OK":
            code = _code_for_exception(exc)
        elif code not in _CODES:
            code = "UNKNOWN"
        with self._counts.lock:
            # Failures and images are counted by their own calls (`Metrics.failure`, `Metrics.images`).
            self._counts.finish(self.api, code, "", elapsed, 0)


class _NullRequest:
    """Disabled metrics: a shared, reusable context manager whose `.code` is accepted and ignored."""

    __slots__ = ("api", "code")

    def __init__(self) -> None:
        self.code = "OK"
        self.api = ""

    def __enter__(self) -> _NullRequest:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _StageTimer:
    """Observes one stage histogram of a series with perf_counter."""

    __slots__ = ("_counts", "_histogram", "_start")

    def __init__(self, counts: SeriesCounts, stage: str) -> None:
        self._counts = counts
        self._histogram = counts.stages[stage]

    def __enter__(self) -> _StageTimer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self._start
        with self._counts.lock:
            observe(self._histogram, LATENCY_BUCKETS, elapsed)


class _NullStage:
    __slots__ = ()

    def __enter__(self) -> _NullStage:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


_NULL_REQUEST = _NullRequest()
_NULL_STAGE = _NullStage()


class ModelObserver:
    """Pre-resolved recorders for one (model, version): what a batcher calls per batch, with no lookups."""

    __slots__ = ("_counts",)

    def __init__(self, counts: SeriesCounts | None) -> None:
        self._counts = counts

    def observe_batch(self, size: int) -> None:
        """One executed ONNX Runtime run of `size` images."""
        c = self._counts
        if c is not None:
            with c.lock:
                observe(c.batch, BATCH_SIZE_BUCKETS, size)

    def observe_queue_wait(self, seconds: float) -> None:
        """Time one request spent queued before its batch started."""
        c = self._counts
        if c is not None:
            with c.lock:
                c.queued(seconds)

    def set_queue_depth(self, n: int) -> None:
        """Images currently waiting in the batcher's queue."""
        if self._counts is not None:
            self._counts.queue_depth = n  # one attribute store: atomic, no lock needed


_NULL_OBSERVER = ModelObserver(None)


class _LifecycleFamilies:
    """The families that change only when a model version loads or the process starts."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.model_state = Gauge(
            "convserve_model_state", "1 for the state each model version is in, 0 for the others.",
            (*_MV, "state"), registry=r,
        )  # fmt: skip
        self.model_info = Gauge(
            "convserve_model_info", "Always 1; labels name the model version and its execution provider.",
            (*_MV, "provider"), registry=r,
        )  # fmt: skip
        self.build_info = Gauge(
            "convserve_build_info", "Always 1; labels name the convserve, Python and ONNX Runtime versions.",
            ("version", "python_version", "onnxruntime_version"), registry=r,
        )  # fmt: skip
        self.start_time = Gauge(
            "convserve_start_time_seconds", "Unix time the server process started serving.", registry=r
        )


def _code_for_exception(exc: BaseException) -> str:
    """The status an exception leaving a request will turn into, when the caller did not set one."""
    import asyncio

    from convserve.server.errors import ConvserveServerError, status_for

    if isinstance(exc, ConvserveServerError):
        return status_for(exc).name
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return "INTERNAL"


def _package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def process_registry() -> CollectorRegistry:
    """A private registry with the standard process, platform and GC collectors."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class Metrics:
    """convserve's metrics on one registry; inject a fresh one per server so tests can run several.

    `registry=None` creates a private registry with the standard process, platform and GC collectors.
    `enabled=False` returns shared no-op recorders from every method and registers nothing.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry = process_registry() if registry is None else registry
        self._lock = threading.Lock()
        self._known: set[tuple[str, str]] = set()
        self._known_models: set[str] = set()
        self._series: dict[tuple[str, str], SeriesCounts] = {}
        self._provider: dict[tuple[str, str], str] = {}
        self._http: Any = None
        self._http_thread: threading.Thread | None = None
        if not enabled:
            return
        # Registered first: the per-request families lead the exposition, as they always have.
        self.registry.register(CountsCollector(self._all_series))
        self._f = _LifecycleFamilies(self.registry)
        self._f.build_info.labels(
            _package_version("convserve"), platform.python_version(), _package_version("onnxruntime")
        ).set(1)
        self._f.start_time.set(time.time())

    # -- labels -------------------------------------------------------------------------------------------
    def register_model(self, model: str, version: str) -> None:
        """Allow (model, version) as label values; `set_model_state` does this for the repository."""
        with self._lock:
            self._known.add((model, version))
            self._known_models.add(model)

    def counts(self, model: str, version: str) -> SeriesCounts | None:
        """The counts a model version's ``ModelStats`` records into (None when metrics are off).

        One object per label pair for the process's life: a version that reloads keeps counting where
        it was, and its old and new ``ModelStats`` share the object and its lock while both serve.
        """
        return self._get(model, version) if self.enabled else None

    def _get(self, model: str, version: str) -> SeriesCounts:
        """The counts for a pair; an unknown pair folds into (model, "") or ("", ""), never its own."""
        series = self._series.get((model, version))
        if series is not None:
            return series
        if (model, version) in self._known:
            key = (model, version)
        elif model in self._known_models:
            key = (model, "")
        else:
            # Requests for unknown models are still counted, under empty labels rather than a series per name.
            key = ("", "")
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = SeriesCounts(*key)
        return series

    def _all_series(self) -> list[SeriesCounts]:
        with self._lock:
            return list(self._series.values())

    # -- recording outside ModelStats (lookup failures, tests) -------------------------------------------
    def request(self, model: str, version: str, api: str) -> RequestHandle | _NullRequest:
        """Context manager around one inference request: e2e duration, in-flight, and requests_total{code}.

        Set `.code` on the yielded handle to the status name the call ends with; an exception leaving the
        block with `.code` still "OK" is counted as the status it maps to (INTERNAL when unmapped).
        """
        if not self.enabled:
            return _NULL_REQUEST
        if api not in API_NAMES:
            api = _UNKNOWN_API
        return RequestHandle(self._get(model, version), api)

    def stage(self, stage: str, model: str, version: str) -> _StageTimer | _NullStage:
        """Context manager timing one stage ("queue", "preprocess", "inference", "postprocess")."""
        if not self.enabled:
            return _NULL_STAGE
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        # A fresh timer per use: the same stage may be timed concurrently by several requests.
        return _StageTimer(self._get(model, version), stage)

    def observer(self, model: str, version: str) -> ModelObserver:
        """Pre-resolved batch-size / queue-wait / queue-depth recorders for one model version's batcher."""
        if not self.enabled:
            return _NULL_OBSERVER
        return ModelObserver(self._get(model, version))

    def observe_batch(self, model: str, version: str, size: int) -> None:
        """One executed ONNX Runtime run of `size` images."""
        self.observer(model, version).observe_batch(size)

    def queue_wait(self, model: str, version: str, seconds: float) -> None:
        """Time one request waited in the batcher queue (when it is measured rather than timed in a block)."""
        self.observer(model, version).observe_queue_wait(seconds)

    def images(self, model: str, version: str, api: str, n: int) -> None:
        """`n` images classified successfully."""
        if self.enabled:
            c = self._get(model, version)
            with c.lock:
                c.count_images(api if api in API_NAMES else _UNKNOWN_API, n)

    def failure(self, model: str, version: str, api: str, reason: str) -> None:
        """A failed request; `reason` is the domain error's fixed `reason` string, never client text."""
        if self.enabled:
            c = self._get(model, version)
            with c.lock:
                c.count_failure(api if api in API_NAMES else _UNKNOWN_API, reason)

    def set_queue_depth(self, model: str, version: str, n: int) -> None:
        """Images waiting in the model version's batcher queue."""
        self.observer(model, version).set_queue_depth(n)

    # -- model lifecycle ----------------------------------------------------------------------------------
    def set_model_state(self, model: str, version: str, state: str, provider: str = "") -> None:
        """Record a model version's state (one of MODEL_STATES) and, when known, its execution provider."""
        if state not in MODEL_STATES:
            raise ValueError(f"state must be one of {MODEL_STATES}, got {state!r}")
        self.register_model(model, version)
        if not self.enabled:
            return
        for s in MODEL_STATES:
            self._f.model_state.labels(model, version, s).set(1 if s == state else 0)
        if provider:
            old = self._provider.get((model, version))
            if old is not None and old != provider:
                self._f.model_info.remove(model, version, old)
            self._provider[(model, version)] = provider
            self._f.model_info.labels(model, version, provider).set(1)

    # -- exposition ---------------------------------------------------------------------------------------
    def start_http_server(self, host: str, port: int) -> int:
        """Serve /metrics (and nothing else: other paths answer 404) from a daemon thread, off the event
        loop; returns the bound port."""
        if self._http is not None:
            raise RuntimeError("the metrics endpoint is already running")

        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

        class Server(_ThreadingWSGIServer):
            address_family = family

        app = _metrics_only(prometheus_client.make_wsgi_app(self.registry))
        server = make_server(host, port, app, Server, handler_class=_QuietHandler)
        thread = threading.Thread(target=server.serve_forever, name="convserve-metrics", daemon=True)
        thread.start()
        self._http, self._http_thread = server, thread
        return int(server.server_port)

    def stop(self) -> None:
        """Stop the /metrics endpoint if it runs; safe to call twice."""
        server, thread = self._http, self._http_thread
        self._http = self._http_thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)

    def exposition(self) -> bytes:
        """The current text exposition, as /metrics would serve it."""
        return prometheus_client.generate_latest(self.registry)

    @property
    def known_models(self) -> Iterable[tuple[str, str]]:
        """The (model, version) pairs allowed as label values."""
        return frozenset(self._known)


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """No stderr line per scrape: requests are not worth a log line here."""

    def log_message(self, format: str, *args: Any) -> None:
        return None


def _metrics_only(app: Callable[..., Any]) -> Callable[..., Any]:
    """The exposition at /metrics; 404 elsewhere, so a probe of another path never reads as healthy."""

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") == "/metrics":
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: this port serves only /metrics (the v2 REST API has its own port)\n"]

    return serve
