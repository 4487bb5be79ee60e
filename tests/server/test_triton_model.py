"""The transport-neutral Triton converters: statistics snapshots and configs as Triton's messages."""

from __future__ import annotations

import random
from dataclasses import dataclass

from convserve.common.model_config import Batching, ModelConfig, VersionPolicy
from convserve.server.core.triton_model import model_config, model_statistics
from convserve.server.settings import Settings


@dataclass(frozen=True)
class _Duration:
    count: int
    ns: int


@dataclass(frozen=True)
class _Batch:
    batch_size: int
    compute_input: _Duration
    compute_infer: _Duration
    compute_output: _Duration


@dataclass(frozen=True)
class _Snapshot:
    """The shape ``served.stats.snapshot()`` returns (the request path's per-version recorder)."""

    name: str
    version: str
    last_inference_ms: int
    inference_count: int
    execution_count: int
    success: _Duration
    fail: _Duration
    queue: _Duration
    compute_input: _Duration
    compute_infer: _Duration
    compute_output: _Duration
    batch_stats: tuple[_Batch, ...]


def test_model_statistics_carries_every_counter() -> None:
    rng = random.Random(0)

    def d() -> _Duration:
        return _Duration(rng.randrange(1, 10**6), rng.randrange(1, 10**12))

    snap = _Snapshot(
        "m",
        "3",
        rng.randrange(10**12),
        rng.randrange(10**6),
        rng.randrange(10**6),
        d(),
        d(),
        d(),
        d(),
        d(),
        d(),
        tuple(_Batch(size, d(), d(), d()) for size in (1, 4, 8)),
    )
    msg = model_statistics(snap)
    assert (msg.name, msg.version, msg.last_inference) == (snap.name, snap.version, snap.last_inference_ms)
    assert (msg.inference_count, msg.execution_count) == (snap.inference_count, snap.execution_count)
    for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        got = getattr(msg.inference_stats, field)
        assert (got.count, got.ns) == (getattr(snap, field).count, getattr(snap, field).ns), field
    assert [b.batch_size for b in msg.batch_stats] == [1, 4, 8]
    for got, want in zip(msg.batch_stats, snap.batch_stats, strict=True):
        for field in ("compute_input", "compute_infer", "compute_output"):
            assert getattr(got, field).ns == getattr(want, field).ns


def test_model_config_fills_server_defaults_and_keeps_model_values() -> None:
    cfg = ModelConfig(
        name="m",
        labels=("a", "b", "c"),
        max_batch_size=8,
        batching=Batching(max_queue_delay_us=250, preferred_batch_sizes=(4, 8)),
        version_policy=VersionPolicy(latest=None, all=True),
    )
    settings = Settings(max_queue_size=77, instances=3)
    msg = model_config(cfg, settings, provider="CUDAExecutionProvider")
    assert msg.max_batch_size == 8 and list(msg.output[0].dims) == [3]
    assert list(msg.input[0].dims) == list(cfg.input.shape)
    assert msg.dynamic_batching.max_queue_delay_microseconds == 250
    assert list(msg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert msg.dynamic_batching.default_queue_policy.max_queue_size == 77
    assert msg.instance_group[0].count == 3 and msg.instance_group[0].kind == msg.instance_group[0].KIND_GPU
    assert msg.version_policy.WhichOneof("policy_choice") == "all"
    off = model_config(cfg.replace(batching=Batching(enabled=False)), settings)
    assert not off.HasField("dynamic_batching")
