"""The per-request convserve_* families, recorded as plain counts and built at scrape time, expose exactly
what prometheus_client's own Counter / Histogram / Gauge children expose for the same events."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from convserve.server.observability.metrics import BATCH_SIZE_BUCKETS, LATENCY_BUCKETS, STAGES, Metrics
from convserve.server.observability.stats import ModelStats

MV = ("model", "version")
MVA = ("model", "version", "api")
STAGE_NAMES = {
    "queue": "convserve_queue_wait_seconds",
    "preprocess": "convserve_preprocess_seconds",
    "inference": "convserve_inference_seconds",
    "postprocess": "convserve_postprocess_seconds",
}


class Reference:
    """The families declared the ordinary prometheus_client way (the names, HELP texts, labels and buckets
    dashboards and alerts rely on), recorded event by event: the independent reference."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "convserve_requests", "Inference requests finished, by gRPC status code.", (*MVA, "code"),
            registry=r,
        )  # fmt: skip
        self.images = Counter(
            "convserve_images", "Images (inferences) processed successfully.", MVA, registry=r
        )
        self.failures = Counter(
            "convserve_request_failures", "Failed inference requests, by reason.", (*MVA, "reason"),
            registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "convserve_request_duration_seconds",
            "Server-side end-to-end duration of an inference request, from arrival to reply.",
            MVA, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        docs = {
            "queue": "Time a request waited in the batcher queue.",
            "preprocess": "Decode, resize and normalise time per request.",
            "inference": "ONNX Runtime run time per executed batch.",
            "postprocess": "Softmax and top-k time per request.",
        }
        self.stages = {
            s: Histogram(STAGE_NAMES[s], docs[s], MV, buckets=LATENCY_BUCKETS, registry=r) for s in STAGES
        }
        self.batch = Histogram(
            "convserve_batch_size", "Images per executed ONNX Runtime run.", MV,
            buckets=BATCH_SIZE_BUCKETS, registry=r,
        )  # fmt: skip
        self.inflight = Gauge(
            "convserve_inflight_requests", "Inference requests being handled right now.", MVA, registry=r
        )
        self.depth = Gauge("convserve_queue_depth", "Images waiting in the batcher queue.", MV, registry=r)

    def series(self, m: str, v: str) -> None:
        """A label pair's always-present series (what exists before its first request)."""
        for s in STAGES:
            self.stages[s].labels(m, v)
        self.batch.labels(m, v)
        self.depth.labels(m, v)

    def started(self, m: str, v: str, api: str) -> None:
        self.duration.labels(m, v, api)
        self.inflight.labels(m, v, api).inc()

    def finished(
        self, m: str, v: str, api: str, code: str, reason: str, seconds: float, images: int,
        input_s: float | None = None, output_s: float | None = None,
    ) -> None:  # fmt: skip
        self.inflight.labels(m, v, api).dec()
        self.duration.labels(m, v, api).observe(seconds)
        self.requests.labels(m, v, api, code).inc()
        if reason:
            self.failures.labels(m, v, api, reason).inc()
        elif images:
            self.images.labels(m, v, api).inc(images)
        if input_s is not None:
            self.stages["preprocess"].labels(m, v).observe(input_s)
        if output_s is not None:
            self.stages["postprocess"].labels(m, v).observe(output_s)

    def run(self, m: str, v: str, size: int, seconds: float) -> None:
        self.batch.labels(m, v).observe(size)
        self.stages["inference"].labels(m, v).observe(seconds)


PER_REQUEST = {
    "convserve_requests", "convserve_images", "convserve_request_failures",
    "convserve_request_duration_seconds", *STAGE_NAMES.values(), "convserve_batch_size",
    "convserve_inflight_requests", "convserve_queue_depth",
}  # fmt: skip


def per_request_lines(text: str) -> list[str]:
    """The exposition lines (HELP, TYPE, samples) of the per-request families, sorted."""
    keep = []
    for line in text.splitlines():
        name = line.split(" ")[2] if line.startswith("#") else line.split("{")[0].split(" ")[0]
        base = name.removesuffix("_total").removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
        if name in PER_REQUEST or base in PER_REQUEST:
            keep.append(line)
    return sorted(keep)


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_known_sequence_exposes_the_same_series_and_values_as_prometheus_client() -> None:
    metrics, ref = Metrics(), Reference()
    metrics.set_model_state("digits", "1", "ready", "CPUExecutionProvider")
    stats = ModelStats(metrics, "digits", "1")
    ref.series("digits", "1")

    # An inline run whose times sit exactly on bucket bounds (5 ms, 100 µs, 750 µs): `le` includes them.
    stats.started("classify")
    ref.started("digits", "1", "classify")
    stats.on_batch(1, 0.005)
    ref.run("digits", "1", 1, 0.005)
    stats.finished("classify", "OK", "", 0.005, 1, 0.0001, 0.00075)
    ref.finished("digits", "1", "classify", "OK", "", 0.005, 1, 0.0001, 0.00075)
    # A batched request: queued, a batch of 4 (a bound), a zero postprocess time (the first bucket).
    stats.started("v2")
    ref.started("digits", "1", "v2")
    stats.on_depth(3)
    stats.on_dequeue(0.0004)
    ref.depth.labels("digits", "1").set(3)
    ref.stages["queue"].labels("digits", "1").observe(0.0004)
    stats.on_batch(4, 0.02)
    ref.run("digits", "1", 4, 0.02)
    stats.finished("v2", "OK", "", 0.03, 4, 0.001, 0.0)
    ref.finished("digits", "1", "v2", "OK", "", 0.03, 4, 0.001, 0.0)
    # A failure (counted with its reason, no images) and a cancellation past every bound (+Inf only).
    stats.started("rest")
    ref.started("digits", "1", "rest")
    stats.finished("rest", "INVALID_ARGUMENT", "invalid_input", 0.0002, 0)
    ref.finished("digits", "1", "rest", "INVALID_ARGUMENT", "invalid_input", 0.0002, 0)
    stats.started("classify")
    ref.started("digits", "1", "classify")
    stats.finished("classify", "CANCELLED", "", 11.0, 2, 0.5)
    ref.finished("digits", "1", "classify", "CANCELLED", "", 11.0, 2, 0.5)
    # Runs at the top bound and past it; a request still in flight at scrape time.
    stats.on_batch(256, 10.0)
    ref.run("digits", "1", 256, 10.0)
    stats.on_batch(300, 0.1)
    ref.run("digits", "1", 300, 0.1)
    stats.started("other")
    ref.started("digits", "1", "other")
    # A reload: the new ModelStats of the same version counts on in the same series.
    reloaded = ModelStats(metrics, "digits", "1")
    reloaded.started("classify")
    ref.started("digits", "1", "classify")
    reloaded.finished("classify", "OK", "", 0.0015, 1, 0.0002, 0.0001)
    ref.finished("digits", "1", "classify", "OK", "", 0.0015, 1, 0.0002, 0.0001)
    # A lookup failure for an unknown model, counted through Metrics: it folds into model="".
    metrics.failure("nope", "3", "classify", "model_not_found")
    ref.series("", "")
    ref.failures.labels("", "", "classify", "model_not_found").inc()

    ours = per_request_lines(metrics.exposition().decode())
    assert ours == per_request_lines(generate_latest(ref.registry).decode())
    assert any("convserve_queue_wait_seconds_bucket" in line for line in ours)  # the filter kept samples

    # The same, read as numbers: the boundary cases land where `le` says.
    mv = {"model": "digits", "version": "1"}
    assert value(metrics, "convserve_inference_seconds_bucket", **mv, le="0.005") == 1
    assert value(metrics, "convserve_inference_seconds_bucket", **mv, le="0.004") == 0
    assert value(metrics, "convserve_preprocess_seconds_bucket", **mv, le="0.0001") == 1
    assert value(metrics, "convserve_postprocess_seconds_bucket", **mv, le="0.0001") == 2  # 0.0 and 1e-4
    assert value(metrics, "convserve_batch_size_bucket", **mv, le="2.0") == 1
    assert value(metrics, "convserve_batch_size_bucket", **mv, le="4.0") == 2
    assert value(metrics, "convserve_batch_size_bucket", **mv, le="256.0") == 3
    assert value(metrics, "convserve_batch_size_bucket", **mv, le="+Inf") == 4
    assert value(metrics, "convserve_request_duration_seconds_bucket", **mv, api="classify", le="10.0") == 2
    assert value(metrics, "convserve_request_duration_seconds_count", **mv, api="classify") == 3
    assert value(metrics, "convserve_inflight_requests", **mv, api="other") == 1
    assert value(metrics, "convserve_inflight_requests", **mv, api="classify") == 0
    assert value(metrics, "convserve_images_total", **mv, api="classify") == 4  # 1 + the cancelled 2 + 1
    assert value(metrics, "convserve_queue_depth", **mv) == 3
    # Triton's counters saw the same requests (both ModelStats share their lock, not their counters).
    snap = stats.snapshot()
    assert (snap.success.count, snap.fail.count, snap.execution_count) == (2, 2, 4)


def test_scrapes_during_concurrent_recording_are_consistent_and_nothing_is_lost() -> None:
    """Worker threads record while the metrics thread reads: every scrape sees whole requests."""
    metrics = Metrics()
    metrics.register_model("digits", "1")
    stats = ModelStats(metrics, "digits", "1")
    threads, per_thread = 4, 3000
    mv = {"model": "digits", "version": "1", "api": "classify"}

    def work() -> None:
        for i in range(per_thread):
            stats.started("classify")
            stats.on_batch(1 + i % 8, 0.001)
            stats.finished("classify", "OK", "", 0.002, 1, 0.0005, 0.0001)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    scrapes = 0
    while any(w.is_alive() for w in workers) and scrapes < 200:
        found = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
        samples = {
            (s.name, s.labels.get("le")): s.value
            for f in found.values()
            for s in f.samples
            if s.labels.get("model") == "digits" and s.labels.get("api") in (None, "classify")
        }
        inflight = samples.get(("convserve_inflight_requests", None), 0)
        done = samples.get(("convserve_requests_total", None), 0)
        assert 0 <= inflight <= threads
        assert samples.get(("convserve_request_duration_seconds_count", None), 0) == done
        assert samples.get(("convserve_request_duration_seconds_bucket", "+Inf"), 0) == done
        scrapes += 1
    for w in workers:
        w.join(timeout=60)
        assert not w.is_alive()
    total = threads * per_thread
    assert value(metrics, "convserve_requests_total", **mv, code="OK") == total
    assert value(metrics, "convserve_images_total", **mv) == total
    assert value(metrics, "convserve_inflight_requests", **mv) == 0
    assert value(metrics, "convserve_batch_size_count", model="digits", version="1") == total
    assert value(metrics, "convserve_request_duration_seconds_sum", **mv) == pytest.approx(total * 0.002)
    assert stats.snapshot().success.count == total


def test_metrics_off_keeps_the_triton_counters_and_exports_no_convserve_family() -> None:
    metrics = Metrics(CollectorRegistry(), enabled=False)
    metrics.register_model("digits", "1")
    assert metrics.counts("digits", "1") is None
    stats = ModelStats(metrics, "digits", "1")
    stats.started("classify")
    stats.on_depth(2)
    stats.on_dequeue(0.001)
    stats.on_batch(2, 0.003)
    stats.finished("classify", "OK", "", 0.004, 2, 0.001, 0.0005)
    snap = stats.snapshot()
    assert (snap.success.count, snap.queue.count, snap.inference_count) == (1, 1, 2)
    assert "convserve_" not in metrics.exposition().decode()
