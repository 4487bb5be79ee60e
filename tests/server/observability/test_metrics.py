"""Metric families, buckets, label validation and the /metrics endpoint, read back through the exposition."""

from __future__ import annotations

import itertools
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from convserve.server.errors import InvalidInputError
from convserve.server.observability.metrics import BATCH_SIZE_BUCKETS, LATENCY_BUCKETS, MODEL_STATES, Metrics

EXPECTED = {
    "convserve_requests": "counter",
    "convserve_images": "counter",
    "convserve_request_failures": "counter",
    "convserve_request_duration_seconds": "histogram",
    "convserve_queue_wait_seconds": "histogram",
    "convserve_preprocess_seconds": "histogram",
    "convserve_inference_seconds": "histogram",
    "convserve_postprocess_seconds": "histogram",
    "convserve_batch_size": "histogram",
    "convserve_inflight_requests": "gauge",
    "convserve_queue_depth": "gauge",
    "convserve_model_state": "gauge",
    "convserve_model_info": "gauge",
    "convserve_build_info": "gauge",
    "convserve_start_time_seconds": "gauge",
}
ALLOWED_LABELS = {"model", "version", "api", "code", "reason", "state", "provider", "le"}


def families(metrics: Metrics) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}


def series_count(metrics: Metrics) -> int:
    return sum(len(f.samples) for name, f in families(metrics).items() if name.startswith("convserve_"))


@pytest.fixture
def metrics() -> Metrics:
    m = Metrics()
    m.set_model_state("digits", "1", "loading")
    m.set_model_state("digits", "1", "ready", "CPUExecutionProvider")
    return m


def test_every_family_is_exported_with_its_type_and_allowed_labels(metrics: Metrics) -> None:
    with metrics.request("digits", "1", "classify"):
        for stage in ("queue", "preprocess", "inference", "postprocess"):
            with metrics.stage(stage, "digits", "1"):
                pass
        metrics.images("digits", "1", "classify", 2)
    metrics.failure("digits", "1", "v2", "invalid_input")
    metrics.observe_batch("digits", "1", 2)
    metrics.set_queue_depth("digits", "1", 0)
    found = families(metrics)
    for name, kind in EXPECTED.items():
        assert name in found, name
        assert found[name].type == kind, name
        assert found[name].documentation, name
    for name, family in found.items():
        if name.startswith("convserve_") and name != "convserve_build_info":
            for sample in family.samples:
                assert set(sample.labels) <= ALLOWED_LABELS, sample
    # The standard process and Python collectors come with a default registry.
    assert "process_cpu_seconds" in found and "python_gc_objects_collected" in found
    assert found["convserve_build_info"].samples[0].value == 1
    assert abs(found["convserve_start_time_seconds"].samples[0].value - time.time()) < 600


def test_latency_buckets_span_100us_to_10s_and_are_dense_in_1_to_50ms() -> None:
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))
    assert LATENCY_BUCKETS[0] == pytest.approx(1e-4) and LATENCY_BUCKETS[-1] == pytest.approx(10.0)
    dense = [b for b in LATENCY_BUCKETS if 0.001 <= b <= 0.05]
    assert len(dense) >= len(LATENCY_BUCKETS) // 2
    # Adjacent bounds in the dense range differ by at most 2x, so interpolation error stays bounded.
    assert all(b / a <= 2.0 for a, b in itertools.pairwise(dense))
    assert list(BATCH_SIZE_BUCKETS) == [2**i for i in range(9)]


def test_histograms_expose_the_documented_buckets(metrics: Metrics) -> None:
    with metrics.request("digits", "1", "v2"):
        pass
    samples = families(metrics)["convserve_request_duration_seconds"].samples
    bounds = sorted({float(s.labels["le"]) for s in samples if s.name.endswith("_bucket")})
    assert bounds == [*LATENCY_BUCKETS, float("inf")]


def test_request_records_duration_code_inflight_and_images(metrics: Metrics) -> None:
    r = metrics.registry
    labels = {"model": "digits", "version": "1", "api": "classify"}
    with metrics.request("digits", "1", "classify") as handle:
        assert r.get_sample_value("convserve_inflight_requests", labels) == 1
        time.sleep(0.003)
        metrics.images("digits", "1", "classify", 4)
    assert handle.code == "OK"
    assert r.get_sample_value("convserve_inflight_requests", labels) == 0
    assert r.get_sample_value("convserve_requests_total", {**labels, "code": "OK"}) == 1
    assert r.get_sample_value("convserve_images_total", labels) == 4
    assert r.get_sample_value("convserve_request_duration_seconds_count", labels) == 1
    total = r.get_sample_value("convserve_request_duration_seconds_sum", labels)
    assert 0.003 <= total < 1.0
    # The one observation sits in the first bucket whose bound is >= its value, and none below it.
    upper = min(b for b in LATENCY_BUCKETS if b >= total)
    lower = max(b for b in LATENCY_BUCKETS if b < total)
    bucket = "convserve_request_duration_seconds_bucket"
    assert r.get_sample_value(bucket, {**labels, "le": str(upper)}) == 1
    assert r.get_sample_value(bucket, {**labels, "le": str(lower)}) == 0

    with metrics.request("digits", "1", "classify") as handle:
        handle.code = "INVALID_ARGUMENT"
    assert r.get_sample_value("convserve_requests_total", {**labels, "code": "INVALID_ARGUMENT"}) == 1


def test_an_exception_leaving_a_request_counts_as_its_status(metrics: Metrics) -> None:
    r = metrics.registry
    labels = {"model": "digits", "version": "1", "api": "v2"}
    with pytest.raises(InvalidInputError), metrics.request("digits", "1", "v2"):
        raise InvalidInputError("images[0]: not an image")
    with pytest.raises(RuntimeError), metrics.request("digits", "1", "v2"):
        raise RuntimeError("boom")
    assert r.get_sample_value("convserve_requests_total", {**labels, "code": "INVALID_ARGUMENT"}) == 1
    assert r.get_sample_value("convserve_requests_total", {**labels, "code": "INTERNAL"}) == 1
    assert r.get_sample_value("convserve_inflight_requests", labels) == 0


def test_stages_batch_queue_and_failures(metrics: Metrics) -> None:
    r = metrics.registry
    mv = {"model": "digits", "version": "1"}
    with metrics.stage("inference", "digits", "1"):
        time.sleep(0.001)
    metrics.queue_wait("digits", "1", 0.0004)
    observer = metrics.observer("digits", "1")
    observer.observe_batch(8)
    observer.observe_queue_wait(0.002)
    observer.set_queue_depth(5)
    metrics.observe_batch("digits", "1", 1)
    metrics.failure("digits", "1", "classify", "queue_full")
    assert r.get_sample_value("convserve_inference_seconds_count", mv) == 1
    assert r.get_sample_value("convserve_inference_seconds_sum", mv) >= 0.001
    assert r.get_sample_value("convserve_queue_wait_seconds_count", mv) == 2
    assert r.get_sample_value("convserve_queue_wait_seconds_sum", mv) == pytest.approx(0.0024)
    assert r.get_sample_value("convserve_batch_size_count", mv) == 2
    assert r.get_sample_value("convserve_batch_size_sum", mv) == 9
    assert r.get_sample_value("convserve_batch_size_bucket", {**mv, "le": "1.0"}) == 1
    assert r.get_sample_value("convserve_queue_depth", mv) == 5
    assert (
        r.get_sample_value(
            "convserve_request_failures_total", {**mv, "api": "classify", "reason": "queue_full"}
        )
        == 1
    )
    with pytest.raises(ValueError, match="stage must be one of"):
        metrics.stage("decode", "digits", "1")


def test_unknown_models_never_create_series(metrics: Metrics) -> None:
    r = metrics.registry
    for _ in range(5):
        with metrics.request("nope", "1", "classify") as h:
            h.code = "NOT_FOUND"
        metrics.failure("nope", "1", "classify", "model_not_found")
    before = series_count(metrics)
    for i in range(200):
        with metrics.request(f"made-up-{i}", str(i), "classify") as h:
            h.code = "NOT_FOUND"
        metrics.failure(f"made-up-{i}", str(i), "classify", "model_not_found")
        with metrics.stage("preprocess", f"made-up-{i}", "1"):
            pass
        metrics.images(f"x{i}", "1", f"api{i}", 1)
    # Everything above folded into the model="" series created by the first loop (plus the "other" api).
    grown = series_count(metrics) - before
    assert grown <= 40
    empty = {"model": "", "version": "", "api": "classify"}
    assert r.get_sample_value("convserve_requests_total", {**empty, "code": "NOT_FOUND"}) == 205
    assert r.get_sample_value("convserve_images_total", {"model": "", "version": "", "api": "other"}) == 200
    text = metrics.exposition().decode()
    assert "made-up" not in text and "api1" not in text
    # A known model with an unknown version keeps the model name but not the version.
    with metrics.request("digits", "99", "classify") as h:
        h.code = "NOT_FOUND"
    assert (
        r.get_sample_value(
            "convserve_requests_total",
            {"model": "digits", "version": "", "api": "classify", "code": "NOT_FOUND"},
        )
        == 1
    )
    # A status name that is not a gRPC code cannot become a label either.
    with metrics.request("digits", "1", "classify") as h:
        h.code = "I'M A TEAPOT"
    assert (
        r.get_sample_value(
            "convserve_requests_total",
            {"model": "digits", "version": "1", "api": "classify", "code": "UNKNOWN"},
        )
        == 1
    )


def test_model_state_is_one_hot_and_info_follows_the_provider(metrics: Metrics) -> None:
    r = metrics.registry

    def state(s: str) -> float | None:
        return r.get_sample_value("convserve_model_state", {"model": "digits", "version": "1", "state": s})

    assert [state(s) for s in MODEL_STATES] == [0, 1, 0, 0]
    metrics.set_model_state("digits", "1", "failed")
    assert [state(s) for s in MODEL_STATES] == [0, 0, 1, 0]
    info = {"model": "digits", "version": "1"}
    assert r.get_sample_value("convserve_model_info", {**info, "provider": "CPUExecutionProvider"}) == 1
    metrics.set_model_state("digits", "1", "ready", "CUDAExecutionProvider")
    assert r.get_sample_value("convserve_model_info", {**info, "provider": "CUDAExecutionProvider"}) == 1
    assert r.get_sample_value("convserve_model_info", {**info, "provider": "CPUExecutionProvider"}) is None
    with pytest.raises(ValueError, match="state must be one of"):
        metrics.set_model_state("digits", "1", "sleeping")


def test_disabled_metrics_record_nothing_and_accept_every_call() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry, enabled=False)
    m.set_model_state("digits", "1", "ready", "CPUExecutionProvider")
    with m.request("digits", "1", "classify") as h:
        h.code = "INTERNAL"
        with m.stage("preprocess", "digits", "1"):
            pass
    m.images("digits", "1", "classify", 1)
    m.failure("digits", "1", "classify", "x")
    m.observe_batch("digits", "1", 3)
    m.queue_wait("digits", "1", 0.1)
    m.set_queue_depth("digits", "1", 3)
    m.observer("digits", "1").observe_batch(2)
    assert "convserve_" not in m.exposition().decode()


def test_two_instances_on_fresh_registries_do_not_collide() -> None:
    a, b = Metrics(), Metrics()
    a.set_model_state("digits", "1", "ready")
    with a.request("digits", "1", "classify"):
        pass
    assert a.registry.get_sample_value("convserve_requests_total", {
        "model": "digits", "version": "1", "api": "classify", "code": "OK"}) == 1  # fmt: skip
    assert "convserve_requests_total{" not in b.exposition().decode()


def test_http_endpoint_serves_metrics_on_an_ephemeral_port_and_stops(metrics: Metrics) -> None:
    port = metrics.start_http_server("127.0.0.1", 0)
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            body = reply.read().decode()
            assert reply.headers["Content-Type"].startswith("text/plain")
        assert 'convserve_model_state{model="digits",state="ready",version="1"} 1.0' in body
        with pytest.raises(RuntimeError):
            metrics.start_http_server("127.0.0.1", 0)
    finally:
        metrics.stop()
    metrics.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_metrics_port_serves_metrics_only_and_404_elsewhere(metrics: Metrics) -> None:
    """A probe of /v2/health/ready (or anything else) on the metrics port must not read as healthy."""
    port = metrics.start_http_server("127.0.0.1", 0)
    try:
        for path in ("/", "/v2/health/ready", "/metricsx", "/metrics/extra"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5)
            assert err.value.code == 404, path
            assert b"serves only /metrics" in err.value.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics?x=1", timeout=5) as reply:
            assert reply.status == 200 and b"convserve_model_state" in reply.read()
    finally:
        metrics.stop()


def test_recording_costs_microseconds_per_request(metrics: Metrics) -> None:
    """A loose guard against a hot-path regression (a .labels() lookup per call); the benchmark measures."""
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        with metrics.request("digits", "1", "classify"):
            with metrics.stage("preprocess", "digits", "1"):
                pass
            with metrics.stage("postprocess", "digits", "1"):
                pass
            metrics.images("digits", "1", "classify", 1)
    per_request = (time.perf_counter() - start) / n
    assert per_request < 200e-6


def test_every_family_is_documented_in_the_metrics_section() -> None:
    """The operations page's Metrics section lists every metric family."""
    page = (Path(__file__).resolve().parents[3] / "docs" / "operations.md").read_text()
    assert "\n## Metrics\n" in page, "no '## Metrics' section in docs/operations.md"
    section = page.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    for name, kind in EXPECTED.items():
        exported = f"{name}_total" if kind == "counter" else name
        assert f"`{exported}`" in section, exported
