"""One recorder per model version: Triton-style cumulative statistics plus its Prometheus counts.

Everything the request path observes about a model version goes through its ``ModelStats`` (``served.stats``),
once: the inference core reports each finished request, the batcher (or the inline path) each executed run.
The counters mirror Triton's ``ModelStatistics`` (success/fail, queue, compute_input, compute_infer,
compute_output as count + nanoseconds; inference and execution counts; per-batch-size execution stats;
the last inference time in Unix milliseconds), so a statistics RPC or ``nv_inference_*`` metrics read
them with ``snapshot()``. With metrics on, the same call also counts into the version's
``metric_counts.SeriesCounts`` (plain dicts and lists, made into ``convserve_*`` families at scrape time)
under that object's lock, which then guards the Triton counters too: one lock per call either way. With
metrics off nothing Prometheus-related happens at all.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .metric_counts import SeriesCounts
    from .metrics import Metrics

__all__ = ["BatchStats", "Duration", "ModelStats", "StatsSnapshot"]

_NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Duration:
    """A cumulative (count, total nanoseconds) pair: Triton's StatisticDuration."""

    count: int = 0
    ns: int = 0


@dataclass(frozen=True, slots=True)
class BatchStats:
    """Executions of one batch size: Triton's InferBatchStatistics."""

    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """A consistent copy of one model version's counters (Triton's ModelStatistics fields)."""

    name: str
    version: str
    last_inference_ms: int
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    batch_stats: tuple[BatchStats, ...]


class ModelStats:
    """The cumulative counters of one model version, safe to update from the loop and worker threads."""

    def __init__(self, metrics: Metrics | None, model: str, version: str) -> None:
        self.model = model
        self.version = version
        # The version's Prometheus counts (None when metrics are off). Their lock is shared by every
        # ModelStats of this version label (a reload's old and new one), so it guards both kinds of counter.
        counts = metrics.counts(model, version) if metrics is not None else None
        self._counts: SeriesCounts | None = counts
        self._lock = counts.lock if counts is not None else threading.Lock()
        self._success = [0, 0]
        self._fail = [0, 0]
        self._queue = [0, 0]
        self._input = [0, 0]
        self._infer = [0, 0]
        self._output = [0, 0]
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self._batches: dict[int, list[int]] = {}  # size -> [count, infer ns]

    # ---- the request path (event loop) ---------------------------------------------------------------

    def started(self, api: str) -> None:
        """A request for this version entered the core."""
        counts = self._counts
        if counts is not None:
            with self._lock:
                counts.start(api)

    def finished(
        self,
        api: str,
        code: str,
        reason: str,
        seconds: float,
        images: int,
        input_s: float | None = None,
        output_s: float | None = None,
    ) -> None:
        """A request left the core: ``code`` is its status name, ``reason`` the failure's ("" on success;
        a cancelled request has code CANCELLED and no reason); ``input_s``/``output_s`` are its
        compute_input (decode, convert) and compute_output (top-k, reply) times when it got that far.
        One call per request, one lock."""
        ns = int(seconds * _NS)
        counts = self._counts
        with self._lock:
            acc = self._success if code == "OK" else self._fail
            acc[0] += 1
            acc[1] += ns
            if input_s is not None:
                self._input[0] += 1
                self._input[1] += int(input_s * _NS)
            if output_s is not None:
                self._output[0] += 1
                self._output[1] += int(output_s * _NS)
            if counts is not None:
                counts.finish(api, code, reason, seconds, images, input_s, output_s)

    # ---- executions (worker threads or the inline path) --------------------------------------------

    def on_batch(self, size: int, infer_seconds: float) -> None:
        """One ONNX Runtime run of ``size`` images took ``infer_seconds``."""
        ns = int(infer_seconds * _NS)
        counts = self._counts
        with self._lock:
            self.execution_count += 1
            self.inference_count += size
            self._infer[0] += 1
            self._infer[1] += ns
            b = self._batches.get(size)
            if b is None:
                b = self._batches[size] = [0, 0]
            b[0] += 1
            b[1] += ns
            self.last_inference_ms = int(time.time() * 1000)
            if counts is not None:
                counts.run(size, infer_seconds)

    def on_dequeue(self, wait_seconds: float) -> None:
        """A request's first images left the batcher queue after ``wait_seconds``."""
        counts = self._counts
        with self._lock:
            self._queue[0] += 1
            self._queue[1] += int(wait_seconds * _NS)
            if counts is not None:
                counts.queued(wait_seconds)

    def on_depth(self, depth: int) -> None:
        """Images waiting in the batcher queue now."""
        if self._counts is not None:
            self._counts.queue_depth = depth  # one attribute store: atomic, no lock needed

    # ---- reading ------------------------------------------------------------------------------------

    def snapshot(self) -> StatsSnapshot:
        """All counters at one instant."""
        with self._lock:
            return StatsSnapshot(
                name=self.model,
                version=self.version,
                last_inference_ms=self.last_inference_ms,
                inference_count=self.inference_count,
                execution_count=self.execution_count,
                success=Duration(*self._success),
                fail=Duration(*self._fail),
                queue=Duration(*self._queue),
                compute_input=Duration(*self._input),
                compute_infer=Duration(*self._infer),
                compute_output=Duration(*self._output),
                batch_stats=tuple(
                    BatchStats(size, Duration(), Duration(c, ns), Duration())
                    for size, (c, ns) in sorted(self._batches.items())
                ),
            )
