"""One /metrics for many worker processes: the sum of the workers' expositions, monotonic across restarts.

The supervisor reads each worker's text exposition and merges sample by sample (same family, sample
name and labels):
- cumulative families (counters, histograms, Triton's untyped ``nv_inference_*`` counts) add up over
  the live workers plus every replaced worker's last totals, so a worker that dies takes nothing away;
- gauges of quantities (in flight, queue depth, memory, open descriptors) add up over the live workers;
- gauges that describe rather than count (a model's state and info, build info) take the largest value,
  and start times the earliest, so two workers in the same state read as that state once.

A worker's totals are as fresh as the supervisor's last read of it (at every scrape and every few
seconds in between), so a ``kill -9`` loses at most the counts of that interval, never more.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["MetricsSum"]

_CUMULATIVE = frozenset({"counter", "histogram", "summary", "unknown", "untyped", "gaugehistogram"})
_LARGEST = frozenset(
    {
        "convserve_model_state",
        "convserve_model_info",
        "convserve_build_info",
        "python_info",
        "process_max_fds",
    }
)
_EARLIEST = frozenset({"convserve_start_time_seconds", "process_start_time_seconds"})

SampleKey = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class _Family:
    name: str
    doc: str
    type: str
    samples: dict[SampleKey, float] = field(default_factory=dict)


def _parse(text: str) -> dict[str, _Family]:
    families: dict[str, _Family] = {}
    for metric in text_string_to_metric_families(text):
        fam = families.setdefault(metric.name, _Family(metric.name, metric.documentation, metric.type))
        for s in metric.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            fam.samples[key] = fam.samples.get(key, 0.0) + float(s.value)
    return families


class MetricsSum:
    """The merged view over workers: ``update`` with a worker's latest exposition, ``retire`` a worker
    that died (its cumulative totals are kept), ``collect`` the merged families."""

    def __init__(self) -> None:
        self._live: dict[int, dict[str, _Family]] = {}
        self._retired: dict[str, _Family] = {}
        self._order: list[str] = []  # families in first-seen order, as the workers expose them

    def update(self, worker: int, exposition: str) -> None:
        """Replace worker ``worker``'s view with its current exposition (text format)."""
        families = _parse(exposition)
        for name in families:
            if name not in self._order:
                self._order.append(name)
        self._live[worker] = families

    def retire(self, worker: int) -> None:
        """Worker ``worker`` is gone: keep its cumulative totals; forget its gauges."""
        for name, fam in self._live.pop(worker, {}).items():
            if fam.type not in _CUMULATIVE:
                continue
            kept = self._retired.setdefault(name, _Family(name, fam.doc, fam.type))
            for key, value in fam.samples.items():
                kept.samples[key] = kept.samples.get(key, 0.0) + value

    def collect(self) -> Iterable[Metric]:
        """The merged families, for a prometheus_client collector."""
        for name in self._order:
            views = [w[name] for w in self._live.values() if name in w]
            retired = self._retired.get(name)
            first = views[0] if views else retired
            if first is None:
                continue
            merged: dict[SampleKey, float] = {}
            if first.type in _CUMULATIVE:
                for fam in [*views, *([retired] if retired else [])]:
                    for key, value in fam.samples.items():
                        merged[key] = merged.get(key, 0.0) + value
            else:
                pick = max if name in _LARGEST else min if name in _EARLIEST else None
                for fam in views:
                    for key, value in fam.samples.items():
                        if key not in merged:
                            merged[key] = value
                        else:
                            merged[key] = pick(merged[key], value) if pick else merged[key] + value
            metric = Metric(name, first.doc, first.type)
            for (sample, labels), value in merged.items():
                metric.add_sample(sample, dict(labels), value)
            yield metric
