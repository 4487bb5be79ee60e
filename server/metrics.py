"""Every Prometheus metric family convserve exports, declared once with its buckets; the /metrics endpoint.

Latency buckets (seconds), shared by the end-to-end and per-stage histograms so that stages can be compared
and summed bucket by bucket: 100 µs … 10 s, dense between 1 ms and 50 ms where a LeNet request (≈0.3–2 ms)
and a ResNet-18 batch on CPU (≈15–150 ms) land, so `histogram_quantile` interpolates within a few percent
there instead of across a decade. Batch-size buckets are the powers of two up to 256, which is where
`max_batch_size` and preferred batch sizes sit in practice.

Label values never come from a client unchecked: a (model, version) pair becomes a label only once the
repository has announced it through `set_model_state` (or `register_model`); anything else is recorded
under model="" / version="" so that a flood of made-up model names cannot create new time series.
`api` is one of `API_NAMES`, `code` a gRPC status name, and `reason` a domain error's fixed reason string.

Recording is cheap: the labelled children for each (model, version) are resolved once and cached, so the
hot path does a dict lookup and an `observe`, never a `.labels()` call. `Metrics(enabled=False)` records
nothing at all and is what the metrics-off benchmark runs.
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
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
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
]

# Seconds. Dense around 1–50 ms (see the module docstring); +Inf is added by prometheus_client.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.00075,
    0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075,
    0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)

API_NAMES: tuple[str, ...] = ("classify", "v2", "rest")
STAGES: tuple[str, ...] = ("queue", "preprocess", "inference", "postprocess")
MODEL_STATES: tuple[str, ...] = ("loading", "ready", "failed", "unloading")
_CODES = frozenset(code.name for code in grpc.StatusCode)
_UNKNOWN_API = "other"

# `_created` samples would double the series count for no dashboard use; this process is convserve's own.
prometheus_client.disable_created_metrics()

_MV = ("model", "version")
_MVA = ("model", "version", "api")


class RequestHandle:
    """The object `Metrics.request` yields: set `.code` to the gRPC status name the call ends with."""

    __slots__ = ("_duration", "_inflight", "_series", "_start", "api", "code")

    def __init__(self, series: _Series, api: str) -> None:
        self._series = series
        self.api = api
        self.code = "OK"
        self._duration, self._inflight = series.api_children(api)

    def __enter__(self) -> RequestHandle:
        self._inflight.inc()
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        elapsed = time.perf_counter() - self._start
        self._inflight.dec()
        code = self.code
        if exc is not None and code == "OK":
            code = _code_for_exception(exc)
        elif code not in _CODES:
            code = "UNKNOWN"
        self._duration.observe(elapsed)
        self._series.requests(self.api, code).inc()


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
    """Observes one stage histogram child with perf_counter."""

    __slots__ = ("_histogram", "_start")

    def __init__(self, histogram: Any) -> None:
        self._histogram = histogram

    def __enter__(self) -> _StageTimer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._histogram.observe(time.perf_counter() - self._start)


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

    __slots__ = ("_batch", "_depth", "_queue")

    def __init__(self, batch: Any, queue: Any, depth: Any) -> None:
        self._batch = batch
        self._queue = queue
        self._depth = depth

    def observe_batch(self, size: int) -> None:
        """One executed ONNX Runtime run of `size` images."""
        if self._batch is not None:
            self._batch.observe(size)

    def observe_queue_wait(self, seconds: float) -> None:
        """Time one request spent queued before its batch started."""
        if self._queue is not None:
            self._queue.observe(seconds)

    def set_queue_depth(self, n: int) -> None:
        """Images currently waiting in the batcher's queue."""
        if self._depth is not None:
            self._depth.set(n)


_NULL_OBSERVER = ModelObserver(None, None, None)


class _Series:
    """The labelled children of one (model, version), resolved once and then read from dicts.

    Children keyed by api/code/reason are created on first use, so /metrics shows only series that happened.
    """

    def __init__(self, families: _Families, model: str, version: str) -> None:
        self.model = model
        self.version = version
        self._f = families
        self.stages = {stage: families.stages[stage].labels(model, version) for stage in STAGES}
        self.batch = families.batch_size.labels(model, version)
        self.queue_depth = families.queue_depth.labels(model, version)
        self.observer = ModelObserver(self.batch, self.stages["queue"], self.queue_depth)
        self.duration: dict[str, Any] = {}
        self.inflight: dict[str, Any] = {}
        self._images: dict[str, Any] = {}
        self._requests: dict[tuple[str, str], Any] = {}
        self._failures: dict[tuple[str, str], Any] = {}

    def api_children(self, api: str) -> tuple[Any, Any]:
        """(duration histogram, in-flight gauge) for an api."""
        duration = self.duration.get(api)
        if duration is None:
            duration = self.duration[api] = self._f.duration.labels(self.model, self.version, api)
            self.inflight[api] = self._f.inflight.labels(self.model, self.version, api)
        return duration, self.inflight[api]

    def images(self, api: str) -> Any:
        child = self._images.get(api)
        if child is None:
            child = self._images[api] = self._f.images.labels(self.model, self.version, api)
        return child

    def requests(self, api: str, code: str) -> Any:
        child = self._requests.get((api, code))
        if child is None:
            child = self._requests[(api, code)] = self._f.requests.labels(self.model, self.version, api, code)
        return child

    def failures(self, api: str, reason: str) -> Any:
        child = self._failures.get((api, reason))
        if child is None:
            child = self._f.failures.labels(self.model, self.version, api, reason)
            self._failures[(api, reason)] = child
        return child


class _Families:
    """The metric families, registered on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.requests = Counter(
            "convserve_requests", "Inference requests finished, by gRPC status code.",
            (*_MVA, "code"), registry=r,
        )  # fmt: skip
        self.images = Counter(
            "convserve_images", "Images (inferences) processed successfully.", _MVA, registry=r
        )
        self.failures = Counter(
            "convserve_request_failures", "Failed inference requests, by reason.",
            (*_MVA, "reason"), registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "convserve_request_duration_seconds",
            "Server-side end-to-end duration of an inference request, from arrival to reply.",
            _MVA, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        stage_help = {
            "queue": ("convserve_queue_wait_seconds", "Time a request waited in the batcher queue."),
            "preprocess": ("convserve_preprocess_seconds", "Decode, resize and normalise time per request."),
            "inference": ("convserve_inference_seconds", "ONNX Runtime run time per executed batch."),
            "postprocess": ("convserve_postprocess_seconds", "Softmax and top-k time per request."),
        }
        self.stages = {
            stage: Histogram(name, doc, _MV, buckets=LATENCY_BUCKETS, registry=r)
            for stage, (name, doc) in stage_help.items()
        }
        self.batch_size = Histogram(
            "convserve_batch_size", "Images per executed ONNX Runtime run.", _MV,
            buckets=BATCH_SIZE_BUCKETS, registry=r,
        )  # fmt: skip
        self.inflight = Gauge(
            "convserve_inflight_requests", "Inference requests being handled right now.", _MVA, registry=r
        )
        self.queue_depth = Gauge(
            "convserve_queue_depth", "Images waiting in the batcher queue.", _MV, registry=r
        )
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


class Metrics:
    """convserve's metrics on one registry; inject a fresh one per server so tests can run several.

    `registry=None` creates a private registry with the standard process, platform and GC collectors.
    `enabled=False` returns shared no-op recorders from every method: the metrics-off path costs a call.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, enabled: bool = True) -> None:
        self.enabled = enabled
        if registry is None:
            registry = CollectorRegistry(auto_describe=True)
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        self._lock = threading.Lock()
        self._known: set[tuple[str, str]] = set()
        self._known_models: set[str] = set()
        self._series: dict[tuple[str, str], _Series] = {}
        self._provider: dict[tuple[str, str], str] = {}
        self._http: Any = None
        self._http_thread: threading.Thread | None = None
        if not enabled:
            return
        self._f = _Families(registry)
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

    def _get(self, model: str, version: str) -> _Series:
        """Cached children for a pair; an unknown pair folds into (model, "") or ("", ""), never its own."""
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
                series = _Series(self._f, *key)
                self._series[key] = series
        return series

    # -- the request path ---------------------------------------------------------------------------------
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
        try:
            histogram = self._get(model, version).stages[stage]
        except KeyError:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}") from None
        # A fresh timer per use: the same stage may be timed concurrently by several requests.
        return _StageTimer(histogram)

    def observer(self, model: str, version: str) -> ModelObserver:
        """Pre-resolved batch-size / queue-wait / queue-depth recorders for one model version's batcher."""
        if not self.enabled:
            return _NULL_OBSERVER
        return self._get(model, version).observer

    def observe_batch(self, model: str, version: str, size: int) -> None:
        """One executed ONNX Runtime run of `size` images."""
        if self.enabled:
            self._get(model, version).batch.observe(size)

    def queue_wait(self, model: str, version: str, seconds: float) -> None:
        """Time one request waited in the batcher queue (when it is measured rather than timed in a block)."""
        if self.enabled:
            self._get(model, version).stages["queue"].observe(seconds)

    def images(self, model: str, version: str, api: str, n: int) -> None:
        """`n` images classified successfully."""
        if self.enabled:
            self._get(model, version).images(api if api in API_NAMES else _UNKNOWN_API).inc(n)

    def failure(self, model: str, version: str, api: str, reason: str) -> None:
        """A failed request; `reason` is the domain error's fixed `reason` string, never client text."""
        if self.enabled:
            self._get(model, version).failures(api if api in API_NAMES else _UNKNOWN_API, reason).inc()

    def set_queue_depth(self, model: str, version: str, n: int) -> None:
        """Images waiting in the model version's batcher queue."""
        if self.enabled:
            self._get(model, version).queue_depth.set(n)

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
