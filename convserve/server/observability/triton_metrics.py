"""Triton's ``nv_inference_*`` metric families, read from each served version's statistics at scrape time.

A Triton dashboard or alert queries these names with labels ``model`` and ``version``; convserve's own
``convserve_*`` families stay beside them. Nothing is recorded per request for them: a scrape reads the
cumulative counters every version keeps anyway (``served.stats``, the same numbers the statistics
endpoints report), so the request path pays nothing extra and the two views cannot disagree.

The families are exported untyped: Triton exposes its counters without the ``_total`` suffix, and
prometheus_client appends ``_total`` to anything typed counter. PromQL (``rate``, ``increase``) treats
them exactly as counters; a version that reloads starts again from zero, which Prometheus reads as a
counter reset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import Metric, UnknownMetricFamily

from ..repository.model_repository import ModelRepository
from .stats import StatsSnapshot

__all__ = ["FAMILIES", "TritonCollector"]

# (name, help, value) — Triton's names and meanings; durations are cumulative microseconds.
FAMILIES: tuple[tuple[str, str, Callable[[StatsSnapshot], int]], ...] = (
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes",
     lambda s: s.success.count),
    ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes",
     lambda s: s.fail.count),
    ("nv_inference_count", "Number of inferences performed (images, all batch sizes)",
     lambda s: s.inference_count),
    ("nv_inference_exec_count", "Number of model executions performed (ONNX Runtime runs)",
     lambda s: s.execution_count),
    ("nv_inference_request_duration_us", "Cumulative duration of successful inference requests, µs",
     lambda s: s.success.ns // 1000),
    ("nv_inference_queue_duration_us", "Cumulative time requests waited in the batcher queue, µs",
     lambda s: s.queue.ns // 1000),
    ("nv_inference_compute_input_duration_us", "Cumulative input processing (decode, convert) duration, µs",
     lambda s: s.compute_input.ns // 1000),
    ("nv_inference_compute_infer_duration_us", "Cumulative model execution (ONNX Runtime) duration, µs",
     lambda s: s.compute_infer.ns // 1000),
    ("nv_inference_compute_output_duration_us", "Cumulative output processing (top-k, reply) duration, µs",
     lambda s: s.compute_output.ns // 1000),
)  # fmt: skip


class TritonCollector:
    """A prometheus_client collector over the repository's served versions (register it on a registry)."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    def describe(self) -> list[Metric]:
        """The families without samples, so registering never runs a collection."""
        return [UnknownMetricFamily(name, doc, labels=("model", "version")) for name, doc, _ in FAMILIES]

    def collect(self) -> Iterator[Metric]:
        # Runs on the metrics thread: copy the version lists first (the event loop may change them).
        snapshots = [
            sm.stats.snapshot() for entry in self.repository.entries() for sm in list(entry.versions.values())
        ]
        for name, doc, value in FAMILIES:
            family = UnknownMetricFamily(name, doc, labels=("model", "version"))
            for s in snapshots:
                family.add_metric((s.name, s.version), value(s))
            yield family
