"""The per-request ``convserve_*`` families: plain counts per (model, version), made into Prometheus
families at scrape time.

Latency buckets (seconds), shared by the end-to-end and per-stage histograms so that stages can be compared
and summed bucket by bucket: 100 µs … 10 s, dense between 1 ms and 50 ms where a LeNet request (≈0.3–2 ms)
and a ResNet-18 batch on CPU (≈15–150 ms) land, so `histogram_quantile` interpolates within a few percent
there instead of across a decade. Batch-size buckets are the powers of two up to 256, which is where
`max_batch_size` and preferred batch sizes sit in practice.

Why plain counts: a prometheus_client child takes a lock per `inc` and walks its buckets in Python per
`observe`, about 5 µs per request for the ~14 increments and 5 observations a request makes. Here a request
is recorded with dict and list additions under the one lock its ``ModelStats`` takes anyway (a histogram
observation is `bisect_left` into the bounds, C code, plus the sum), and `CountsCollector` turns the counts
into the same families, names, HELP texts, labels and buckets when /metrics is read.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

__all__ = [
    "API_NAMES",
    "BATCH_SIZE_BUCKETS",
    "LATENCY_BUCKETS",
    "STAGES",
    "CountsCollector",
    "SeriesCounts",
]

# Seconds. Dense around 1–50 ms (see the module docstring); the exposition adds +Inf.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.00075,
    0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075,
    0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)

API_NAMES: tuple[str, ...] = ("classify", "v2", "rest")
STAGES: tuple[str, ...] = ("queue", "preprocess", "inference", "postprocess")

_MV = ("model", "version")
_MVA = ("model", "version", "api")

# (name, HELP) of every family this module exports, in exposition order; names without `_total`
# (prometheus_client appends it to counters).
_REQUESTS = ("convserve_requests", "Inference requests finished, by gRPC status code.")
_IMAGES = ("convserve_images", "Images (inferences) processed successfully.")
_FAILURES = ("convserve_request_failures", "Failed inference requests, by reason.")
_DURATION = (
    "convserve_request_duration_seconds",
    "Server-side end-to-end duration of an inference request, from arrival to reply.",
)
_STAGE_FAMILIES: dict[str, tuple[str, str]] = {
    "queue": ("convserve_queue_wait_seconds", "Time a request waited in the batcher queue."),
    "preprocess": ("convserve_preprocess_seconds", "Decode, resize and normalise time per request."),
    "inference": ("convserve_inference_seconds", "ONNX Runtime run time per executed batch."),
    "postprocess": ("convserve_postprocess_seconds", "Softmax and top-k time per request."),
}
_BATCH = ("convserve_batch_size", "Images per executed ONNX Runtime run.")
_INFLIGHT = ("convserve_inflight_requests", "Inference requests being handled right now.")
_DEPTH = ("convserve_queue_depth", "Images waiting in the batcher queue.")


def new_histogram(bounds: tuple[float, ...]) -> list[float]:
    """An empty histogram for ``bounds``: one count per bound, the +Inf count, then the sum."""
    return [0] * (len(bounds) + 1) + [0.0]


def observe(histogram: list[float], bounds: tuple[float, ...], value: float) -> None:
    """Count ``value`` in the first bucket whose bound is >= it (Prometheus' `le`), +Inf past the last.

    ``bisect_left`` returns the first index whose bound is not below ``value``: a value exactly on a
    bound lands in that bound's bucket, as `le` requires. The caller holds the series' lock.
    """
    histogram[bisect_left(bounds, value)] += 1
    histogram[-1] += value


class SeriesCounts:
    """Everything the per-request families count for one (model, version) label pair.

    Writers hold ``lock`` (a ``ModelStats`` records its Triton counters under the same lock, so a request
    costs one acquisition); the collector copies under it. Keys are bounded: ``api`` is one of
    ``API_NAMES`` or "other", ``code`` a gRPC status name, ``reason`` a domain error's fixed string.
    The stage and batch-size histograms and the queue depth exist from the start (zeros on /metrics);
    an api's duration and in-flight series from its first request; the counters from their first count.
    """

    __slots__ = (
        "batch",
        "duration",
        "failures",
        "images",
        "lock",
        "model",
        "queue_depth",
        "requests",
        "stages",
        "started",
        "version",
    )

    def __init__(self, model: str, version: str) -> None:
        self.model = model
        self.version = version
        self.lock = threading.Lock()
        self.started: dict[str, int] = {}  # api -> requests started; in flight = started - finished
        self.requests: dict[tuple[str, str], int] = {}  # (api, code) -> requests finished
        self.images: dict[str, int] = {}  # api -> images of requests that ended without a failure
        self.failures: dict[tuple[str, str], int] = {}  # (api, reason) -> failed requests
        self.duration: dict[str, list[float]] = {}  # api -> end-to-end histogram
        self.stages = {stage: new_histogram(LATENCY_BUCKETS) for stage in STAGES}
        self.batch = new_histogram(BATCH_SIZE_BUCKETS)
        self.queue_depth = 0

    # All below: the caller holds `lock`.

    def start(self, api: str) -> None:
        """A request entered: counted in flight until its `finish`."""
        n = self.started.get(api)
        if n is None:
            n = 0
            self.duration[api] = new_histogram(LATENCY_BUCKETS)
        self.started[api] = n + 1

    def finish(
        self,
        api: str,
        code: str,
        reason: str,
        seconds: float,
        images: int,
        input_s: float | None = None,
        output_s: float | None = None,
    ) -> None:
        """A request ended with status ``code`` after ``seconds``; a failure's ``reason``, or the images it
        classified; its preprocess / postprocess times when it got that far."""
        key = (api, code)
        self.requests[key] = self.requests.get(key, 0) + 1
        if reason:
            key = (api, reason)
            self.failures[key] = self.failures.get(key, 0) + 1
        elif images:
            self.images[api] = self.images.get(api, 0) + images
        duration = self.duration.get(api)
        if duration is None:  # a finish without its start; in flight goes negative, as a gauge would
            duration = self.duration[api] = new_histogram(LATENCY_BUCKETS)
        observe(duration, LATENCY_BUCKETS, seconds)
        if input_s is not None:
            observe(self.stages["preprocess"], LATENCY_BUCKETS, input_s)
        if output_s is not None:
            observe(self.stages["postprocess"], LATENCY_BUCKETS, output_s)

    def count_failure(self, api: str, reason: str) -> None:
        """A failure counted on its own (the request itself is counted by `finish`)."""
        key = (api, reason)
        self.failures[key] = self.failures.get(key, 0) + 1

    def count_images(self, api: str, n: int) -> None:
        """``n`` images classified, counted on their own."""
        self.images[api] = self.images.get(api, 0) + n

    def queued(self, seconds: float) -> None:
        """A request waited ``seconds`` in the batcher queue."""
        observe(self.stages["queue"], LATENCY_BUCKETS, seconds)

    def run(self, size: int, seconds: float) -> None:
        """One ONNX Runtime run of ``size`` images took ``seconds``."""
        observe(self.batch, BATCH_SIZE_BUCKETS, size)
        observe(self.stages["inference"], LATENCY_BUCKETS, seconds)

    def copy(self) -> SeriesCounts:
        """A consistent copy, taken under the lock, to build families from without holding it."""
        c = SeriesCounts.__new__(SeriesCounts)
        c.model, c.version, c.lock = self.model, self.version, self.lock
        with self.lock:
            c.started = dict(self.started)
            c.requests = dict(self.requests)
            c.images = dict(self.images)
            c.failures = dict(self.failures)
            c.duration = {api: list(h) for api, h in self.duration.items()}
            c.stages = {stage: list(h) for stage, h in self.stages.items()}
            c.batch = list(self.batch)
            c.queue_depth = self.queue_depth
        return c


def _buckets(histogram: list[float], les: tuple[str, ...]) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs, +Inf last, as the exposition wants them."""
    out = []
    total = 0.0
    for le, n in zip(les, histogram, strict=False):  # the histogram's last item is the sum
        total += n
        out.append((le, float(total)))
    return out


def _les(bounds: tuple[float, ...]) -> tuple[str, ...]:
    # The `le` strings prometheus_client's own Histogram writes (1 → "1.0", 0.0001 → "0.0001").
    return (*(floatToGoString(b) for b in bounds), "+Inf")


_LATENCY_LES = _les(LATENCY_BUCKETS)
_BATCH_LES = _les(BATCH_SIZE_BUCKETS)


class CountsCollector:
    """A prometheus_client collector turning every series' counts into the per-request families."""

    def __init__(self, series: Callable[[], Iterable[SeriesCounts]]) -> None:
        self._series = series

    def describe(self) -> list[Metric]:
        """The families without samples, so registering never runs a collection."""
        return list(self._families([]))

    def collect(self) -> Iterator[Metric]:
        # Runs on the metrics thread: copy each series under its lock, then build without holding any.
        return self._families([s.copy() for s in self._series()])

    def _families(self, copies: list[SeriesCounts]) -> Iterator[Metric]:
        requests = CounterMetricFamily(*_REQUESTS, labels=(*_MVA, "code"))
        images = CounterMetricFamily(*_IMAGES, labels=_MVA)
        failures = CounterMetricFamily(*_FAILURES, labels=(*_MVA, "reason"))
        duration = HistogramMetricFamily(*_DURATION, labels=_MVA)
        stages = {s: HistogramMetricFamily(*_STAGE_FAMILIES[s], labels=_MV) for s in STAGES}
        batch = HistogramMetricFamily(*_BATCH, labels=_MV)
        inflight = GaugeMetricFamily(*_INFLIGHT, labels=_MVA)
        depth = GaugeMetricFamily(*_DEPTH, labels=_MV)
        for c in copies:
            mv = (c.model, c.version)
            finished: dict[str, int] = {}
            for (api, code), n in c.requests.items():
                requests.add_metric((*mv, api, code), n)
                finished[api] = finished.get(api, 0) + n
            for api, n in c.images.items():
                images.add_metric((*mv, api), n)
            for (api, reason), n in c.failures.items():
                failures.add_metric((*mv, api, reason), n)
            for api, h in c.duration.items():
                duration.add_metric((*mv, api), _buckets(h, _LATENCY_LES), h[-1])
                inflight.add_metric((*mv, api), c.started.get(api, 0) - finished.get(api, 0))
            for stage, h in c.stages.items():
                stages[stage].add_metric(mv, _buckets(h, _LATENCY_LES), h[-1])
            batch.add_metric(mv, _buckets(c.batch, _BATCH_LES), c.batch[-1])
            depth.add_metric(mv, c.queue_depth)
        yield from (requests, images, failures, duration, *stages.values(), batch, inflight, depth)
