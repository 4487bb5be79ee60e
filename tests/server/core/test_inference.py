"""The execution model's invariants (docs/DESIGN.md): big decodes never stall the loop, abandoned work stops,
replies are bounded before they are built, the core serves without any transport, metrics cost little.

Functional tests with generous bounds on a real server (or the real core), not timed micro-benchmarks.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc
from convserve.protos.inference import grpc_service_pb2 as v2pb
from convserve.server.core.inference import (
    EncodedImage,
    InferenceCore,
    InferenceRequest,
    RequestedOutput,
    TensorInput,
)
from convserve.server.errors import InvalidInputError, ReplyTooLargeError
from convserve.server.observability.metrics import Metrics
from convserve.server.repository.model_repository import ModelRepository
from convserve.server.runtime.batcher import Batcher, BatchingPolicy
from convserve.server.runtime.served_model import _spins

from ...conftest import test_settings

BIG = 64 * 1024 * 1024


def count_submits(batcher: Batcher) -> list[int]:
    """Count the requests sent through ``batcher`` from now on: [count], updated in place."""
    submitted, real_submit = [0], batcher.submit

    async def counting_submit(*args: Any, **kwargs: Any) -> Any:
        submitted[0] += 1
        return await real_submit(*args, **kwargs)

    batcher.submit = counting_submit  # type: ignore[method-assign]
    return submitted


def _big_png(side: int = 4000) -> bytes:
    """A side x side RGB PNG that compresses to a few hundred KB but decodes 16 Mpx of real work."""
    rng = np.random.default_rng(0)
    row = rng.integers(0, 256, size=(1, side, 3), dtype=np.uint8)
    img = np.repeat(row, side, axis=0)  # identical rows: tiny once compressed, full cost to decode
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


@pytest.fixture(scope="module")
def big_png() -> bytes:
    return _big_png()


def _tensor(x: np.ndarray) -> pb.Image:
    return pb.Image(tensor=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=list(x.shape), data=x.tobytes()))


GOOD = np.zeros((1, 1, 8, 8), np.float32)


def test_flood_of_big_images_does_not_delay_health_or_small_requests(
    server_factory: Any, big_png: bytes
) -> None:
    """Three clients send 16-Mpx PNGs back to back; health Checks and a small request stay fast."""
    handle = server_factory(max_image_bytes=BIG, max_message_bytes=BIG)
    stop = time.monotonic() + 4.0
    big_done: list[int] = []
    failures: list[BaseException] = []

    def sender() -> None:
        with grpc.insecure_channel(handle.address, options=[("grpc.max_send_message_length", BIG)]) as ch:
            stub = classifier_pb2_grpc.ClassifierStub(ch)
            while time.monotonic() < stop:
                try:
                    stub.Classify(
                        pb.ClassifyRequest(model="rgb", images=[pb.Image(encoded=big_png)]), timeout=30
                    )
                    big_done.append(1)
                except BaseException as exc:  # reported below
                    failures.append(exc)
                    return

    threads = [threading.Thread(target=sender) for _ in range(3)]
    for t in threads:
        t.start()
    health_s: list[float] = []
    small_s: list[float] = []
    try:
        with grpc.insecure_channel(handle.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            stub = classifier_pb2_grpc.ClassifierStub(ch)
            time.sleep(0.5)  # the senders are decoding now
            while time.monotonic() < stop - 0.5:
                t0 = time.perf_counter()
                assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
                health_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                assert stub.Classify(pb.ClassifyRequest(model="gray", images=[_tensor(GOOD)]), timeout=10)
                small_s.append(time.perf_counter() - t0)
                time.sleep(0.02)
    finally:
        for t in threads:
            t.join(60)
    assert not failures, failures
    assert big_done, "no big image was classified"
    # Decoding on the event loop stalls every call for whole decodes (measured: p50 0.5 s, max 1 s); this
    # checks the 90th percentile stays clear of that. The latency target itself (p99 under 250 ms) is a
    # benchmark's to measure (benchmarks/stall.py), not a timed test's.
    for what, seconds in (("health Check", health_s), ("small request", small_s)):
        p90 = float(np.percentile(seconds, 90))
        assert p90 < 0.5, f"{what}: p90 {p90:.3f} s while big images decoded ({len(seconds)} calls)"


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_abandoned_request_stops_consuming_cpu(server_factory: Any, big_png: bytes, how: str) -> None:
    """Twenty-four 16-Mpx images (seconds of decoding): once the deadline passes or the client cancels,
    the server process stops burning CPU within a fraction of a second."""
    handle = server_factory(max_image_bytes=BIG, max_message_bytes=BIG)
    request = pb.ClassifyRequest(model="rgb", images=[pb.Image(encoded=big_png)] * 24)
    with grpc.insecure_channel(handle.address, options=[("grpc.max_send_message_length", BIG)]) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        assert stub.Classify(pb.ClassifyRequest(model="rgb", images=[pb.Image(encoded=big_png)]), timeout=30)
        if how == "deadline":
            with pytest.raises(grpc.RpcError) as err:
                stub.Classify(request, timeout=0.4)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            future = stub.Classify.future(request, timeout=30)
            time.sleep(0.4)
            assert future.cancel()
        time.sleep(0.15)  # the 100 ms the issue allows, plus slack
        cpu0 = time.process_time()  # this process hosts the server: every thread of it counts
        time.sleep(1.0)
        burned = time.process_time() - cpu0
        # Decoding the rest would keep at least one core busy (0.5-2 s of CPU in this window on a shared box).
        assert burned < 0.2, f"{burned:.2f} s of CPU spent in 1 s after the request was abandoned"
        assert stub.Classify(pb.ClassifyRequest(model="gray", images=[_tensor(GOOD)]), timeout=10).results


def test_duplicate_outputs_are_refused(v2: Any) -> None:
    x = np.zeros((2, 1, 8, 8), np.float32)
    inp = v2pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[2, 1, 8, 8])
    out = v2pb.ModelInferRequest.InferRequestedOutputTensor
    request = v2pb.ModelInferRequest(
        model_name="gray", inputs=[inp], raw_input_contents=[x.tobytes()], outputs=[out(name="logits")] * 300
    )
    with pytest.raises(grpc.RpcError) as err:
        v2.ModelInfer(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "outputs: 'logits' is requested more than once" in err.value.details()
    del request.outputs[1:]
    assert list(v2.ModelInfer(request, timeout=10).outputs[0].shape) == [2, 4]


def test_reply_over_the_message_limit_is_refused_before_the_model_runs(server_factory: Any) -> None:
    handle = server_factory(max_message_bytes=20_000)
    served = handle.running.repository.resolve("gray", 0)
    pixels = np.zeros((280, 1, 8, 8), np.uint8)  # 18 KB in; top-4 strings for 280 images do not fit out
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=list(pixels.shape), data=pixels.tobytes())
    big = pb.ClassifyRequest(model="gray", top_k=4, images=[pb.Image(tensor=tensor)])
    with grpc.insecure_channel(handle.address) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        before = served.stats.snapshot().execution_count
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(big, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the reply for 280 images would be about" in err.value.details()
        assert "over the largest message this server sends (20000 bytes)" in err.value.details()
        assert served.stats.snapshot().execution_count == before  # refused before any work
        reply = stub.Classify(pb.ClassifyRequest(model="gray", images=[_tensor(GOOD)]), timeout=10)
        assert len(reply.results) == 1


def _run_core(model_repository: Path, body: Any, metrics_enabled: bool = True, **overrides: Any) -> Any:
    """Load the repository and run ``body(core, repository)`` on a fresh loop, with no server at all."""

    async def main() -> Any:
        settings = test_settings(model_repository, **overrides)
        metrics = Metrics(enabled=metrics_enabled)
        repository = ModelRepository(model_repository, settings, metrics)
        repository.scan()
        await repository.load_all()
        core = InferenceCore(repository, settings, metrics)
        try:
            return await body(core, repository)
        finally:
            core.close()
            await repository.stop(1.0)

    return asyncio.run(asyncio.wait_for(main(), 120))


def test_core_serves_without_a_transport_and_keeps_triton_style_stats(
    model_repository: Path, encode_png: Any, run_reference: Any
) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 1, 8, 8)).astype(np.float32)
    png = encode_png(np.full((8, 8), 200, np.uint8))

    async def body(core: InferenceCore, repository: ModelRepository) -> None:
        served = repository.resolve("gray", 1)
        result = await core.infer(
            InferenceRequest(
                model="gray", version=1,
                inputs=[TensorInput(x.tobytes(), "float32", x.shape, "t"), EncodedImage(png, "png")],
                outputs=[RequestedOutput(classification=None), ],
                deadline=time.monotonic() + 10, request_id="r1",
            )
        )  # fmt: skip
        assert (result.model, result.version, result.images) == ("gray", 1, 4)
        raw = result.outputs[0].raw
        np.testing.assert_allclose(
            raw[:3], run_reference(model_repository / "gray" / "1" / "model.onnx", x), rtol=1e-5, atol=1e-5
        )
        tensor = [TensorInput(x.tobytes(), "float32", x.shape)]
        both = [RequestedOutput(), RequestedOutput(classification=2)]
        with pytest.raises(InvalidInputError, match="requested more than once"):
            await core.infer(InferenceRequest(model="gray", version=1, inputs=tensor, outputs=both))
        core.max_reply_bytes = 100
        with pytest.raises(ReplyTooLargeError):
            await core.infer(InferenceRequest(model="gray", version=1, inputs=tensor))
        snap = served.stats.snapshot()
        assert (snap.success.count, snap.fail.count) == (1, 2)
        assert snap.inference_count == 4 and snap.execution_count >= 1
        assert snap.compute_input.count == 1 and snap.compute_output.count == 1
        assert sum(b.compute_infer.count for b in snap.batch_stats) == snap.execution_count
        assert snap.success.ns > 0 and snap.last_inference_ms > 0

    _run_core(model_repository, body)


def test_batching_policy_is_typed_frozen_and_validated_once() -> None:
    policy = BatchingPolicy(max_batch_size=8, preferred_batch_sizes=(4, 2, 4))
    assert policy.preferred_batch_sizes == (2, 4)
    with pytest.raises(AttributeError):
        policy.max_batch_size = 9  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"preferred_batch_sizes must lie in 1\.\.8, got \[9\]"):
        BatchingPolicy(max_batch_size=8, preferred_batch_sizes=(9,))
    with pytest.raises(ValueError, match="max_queue_size must be >= 1"):
        BatchingPolicy(max_batch_size=8, max_queue_size=0)


def test_pessimistic_inline_estimate_recovers(model_repository: Path) -> None:
    """A load-time probe slowed by a busy machine must not send a cheap model through the batcher forever.

    On a busy box LeNet's probe read 169 µs against the 150 µs bound; the estimate was only updated by
    inline runs, so it never came back down and every single-image request paid the batcher's thread hop.
    Here the estimate starts at twice the bound; serial single-image requests (batcher idle) must bring it
    back under the bound and then run inline."""
    x = np.zeros((1, 1, 8, 8), np.float32)

    async def body(core: InferenceCore, repository: ModelRepository) -> tuple[float, float, int, int]:
        served = repository.resolve("gray", 1)
        assert served.inline_session is not None, "the 8x8 test model is cheap enough to run inline"
        served.inline_run_s = 2 * served.inline_max_s
        for _ in range(400):
            await served.infer(x)
        batcher = served.batcher
        assert batcher is not None
        submitted = count_submits(batcher)
        for _ in range(50):
            await served.infer(x)
        return served.inline_run_s, served.inline_max_s, submitted[0], 50

    # A 1 ms bound: the 8x8 model's runs cost tens of µs, so a busy box (this suite shares its cores)
    # cannot push a recovered estimate over it, while a stuck one stays at twice the bound.
    estimate, bound, submitted, sent = _run_core(model_repository, body, inline_inference_us=1000)
    assert estimate <= bound, f"inline estimate stuck at {estimate * 1e6:.0f} µs (bound {bound * 1e6:.0f} µs)"
    assert submitted <= sent // 10, f"{submitted} of {sent} idle single-image requests went to the batcher"


def test_occasional_slow_inline_runs_keep_a_cheap_model_on_the_loop(model_repository: Path) -> None:
    """A busy machine slows some runs of a cheap model (preemption, cache misses), not the model: the
    inline estimate must not follow them over the bound. It was a running mean of thread CPU time, which
    on the shared box read LeNet at ~200 µs against a 150 µs bound and sent nearly every single image
    through the batcher. Here every other inline run burns twice the bound; the model's own run is cheap."""
    x = np.zeros((1, 1, 8, 8), np.float32)

    class NeverOffload:  # only the estimate decides here; the loop-load rule has its own tests
        def offload(self, now: float, thread_cpu: Any) -> bool:
            return False

    async def body(core: InferenceCore, repository: ModelRepository) -> tuple[int, int, float]:
        served = repository.resolve("gray", 1)
        inline = served.inline_session
        assert inline is not None, "the 8x8 test model is cheap enough to run inline"
        served.loop_load = NeverOffload()  # type: ignore[assignment]
        real_run, calls = inline.run, [0]

        def sometimes_slow(batch: np.ndarray) -> np.ndarray:
            calls[0] += 1
            if calls[0] % 2 == 0:
                end = time.thread_time() + 2 * served.inline_max_s  # CPU burnt on this thread
                while time.thread_time() < end:
                    pass
            return real_run(batch)

        inline.run = sometimes_slow  # type: ignore[method-assign]
        for _ in range(96):
            await served.infer(x)
        batcher = served.batcher
        assert batcher is not None
        submitted = count_submits(batcher)
        for _ in range(64):
            await served.infer(x)
        return submitted[0], 64, served.inline_run_s

    # A 1 ms bound, as above: a busy box cannot push the model's fast runs over it.
    submitted, sent, estimate = _run_core(model_repository, body, inline_inference_us=1000)
    assert submitted <= sent // 10, (
        f"{submitted} of {sent} idle single-image requests went to the batcher "
        f"(estimate {estimate * 1e6:.0f} µs)"
    )


@pytest.mark.parametrize(("offload_busy_loop", "to_batcher"), [(False, 0), (True, 16)])
def test_a_saturated_loop_offloads_cheap_single_images_only_when_asked(
    model_repository: Path, offload_busy_loop: bool, to_batcher: int
) -> None:
    """Under h2load on 2 cores, sending cheap single images from a busy loop to the batcher cost 130-340 µs
    of server CPU per request and lost throughput at C=8/32/128 (docs/DESIGN.md), so by default a cheap
    model's single images stay inline whatever the loop's load; ``offload_busy_loop`` brings the offload
    back for setups where a spare core pays for the thread hop."""
    x = np.zeros((1, 1, 8, 8), np.float32)

    class Saturated:  # the loop-load rule says "offload" every time it is asked
        def offload(self, now: float, thread_cpu: Any) -> bool:
            return True

    async def body(core: InferenceCore, repository: ModelRepository) -> int:
        served = repository.resolve("gray", 1)
        assert served.inline_session is not None, "the 8x8 test model is cheap enough to run inline"
        served.loop_load = Saturated()  # type: ignore[assignment]
        batcher = served.batcher
        assert batcher is not None
        submitted = count_submits(batcher)
        for _ in range(16):
            await served.infer(x)
        return submitted[0]

    sent = _run_core(model_repository, body, inline_inference_us=1000, offload_busy_loop=offload_busy_loop)
    assert sent == to_batcher, f"{sent} of 16 single images went to the batcher"


@pytest.mark.parametrize(("spin_above_us", "spins"), [(-1, False), (1000, False), (0, True)])
def test_only_models_with_expensive_runs_spin_onnx_runtime_threads(
    model_repository: Path, run_reference: Any, spin_above_us: int, spins: bool
) -> None:
    """Spinning intra-op threads speed up a long run (ResNet-18 at C=1: +13% img/s) but slow a cheap model
    under concurrency (LeNet C=32: -15%), because they take the event loop's core: only a model whose
    one-image run exceeds ``spin_above_us`` spins, and a spinning session answers like any other."""
    x = np.random.default_rng(11).normal(size=(5, 1, 8, 8)).astype(np.float32)

    async def body(core: InferenceCore, repository: ModelRepository) -> tuple[bool, np.ndarray]:
        served = repository.resolve("gray", 1)
        assert served.session is not None
        return served.session.spinning, await served.infer(x)

    spinning, out = _run_core(model_repository, body, spin_above_us=spin_above_us)
    assert spinning is spins, f"the 8x8 model (a ~10 µs run) with spin_above_us={spin_above_us}"
    reference = run_reference(model_repository / "gray" / "1" / "model.onnx", x)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


def test_a_cheap_models_batches_spin_only_when_no_other_request_waits(model_repository: Path) -> None:
    """A cheap model's costly batch run alone (a client sending 64-image requests one at a time) is faster
    on a session whose threads spin during the run (LeNet batch 64, C=1: 0.94x against 0.81x the plain
    server's img/s); with other requests waiting, or for small batches (stream messages merged a few at a
    time), spinning took the core the loop works on, so those runs use the sleeping session."""
    x = np.random.default_rng(12).normal(size=(4, 1, 8, 8)).astype(np.float32)

    async def body(core: InferenceCore, repository: ModelRepository) -> list[str]:
        served = repository.resolve("gray", 1)
        assert served.lone_session is not None and served.lone_session.spinning
        assert served.session is not None and not served.session.spinning
        used: list[str] = []
        for name in ("session", "lone_session"):
            session = getattr(served, name)

            def recording(batch: np.ndarray, run: Any = session.run, name: str = name) -> np.ndarray:
                used.append(name)
                return run(batch)

            session.run = recording
        served.inline_run_s = 1e-6  # 4 rows estimated at 4 µs: below the bound, sleeping threads
        await served.infer(x)
        served.inline_run_s = 1e-3  # 4 ms: above it, and alone (pending 1): spinning threads
        await served.infer(x)
        served._pending += 1  # as costly, but another request of this version waits on the batcher
        try:
            await served.infer(x)
        finally:
            served._pending -= 1
        return used

    assert _run_core(model_repository, body, spin_above_us=1000) == ["session", "lone_session", "session"]
    never = _run_core(model_repository, _lone_session_of, spin_above_us=-1)
    assert never is None, "spin_above_us=-1 never spins"


async def _lone_session_of(core: InferenceCore, repository: ModelRepository) -> Any:
    return repository.resolve("gray", 1).lone_session


def test_sessions_on_a_gpu_never_spin(model_repository: Path) -> None:
    """On a GPU the intra-op threads would spin through every kernel the device runs, taking CPU cores."""
    cpu, gpu = (SimpleNamespace(provider=f"{p}ExecutionProvider") for p in ("CPU", "CUDA"))
    settings = test_settings(model_repository, spin_above_us=0)
    assert _spins(settings, cpu) and not _spins(settings, gpu)
    assert not _spins(test_settings(model_repository, spin_above_us=-1), cpu)


def test_startup_objects_are_frozen_out_of_full_collections() -> None:
    """Once the models are loaded, ``serve`` moves every live object out of the cyclic GC's reach: a full
    collection walked ~45k startup objects on the event loop (26 ms on a busy box, every RPC stalled)."""
    import gc

    from convserve.server.app import _freeze_startup_objects

    gc.collect()
    alive = len(gc.get_objects())
    try:
        _freeze_startup_objects()
        assert gc.get_freeze_count() >= alive * 0.9
        assert len(gc.get_objects()) < alive * 0.1  # what a full collection still walks
    finally:
        gc.unfreeze()


def test_cheap_single_images_leave_the_loop_only_while_it_is_saturated_by_concurrent_requests() -> None:
    """Inline runs keep the batcher idle, so back-to-back requests never merged there and the loop capped
    LeNet at C=32 (~1.8k vs ~2.4k req/s through the batcher). The rule, on a scripted clock: a loop on CPU
    most of a window offloads; it keeps offloading while requests overlap in the batcher; a serial client
    (no overlap) goes back inline and is not offloaded again during the back-off; a quiet loop goes back."""
    from convserve.server.runtime import served_model as sm

    w = sm.LOOP_WINDOW_S * 1.01  # a window and a bit: no float rounding at the boundary
    clock = {"now": 1000.0, "cpu": 0.0, "reads": 0}

    def thread_cpu() -> float:
        clock["reads"] += 1
        return clock["cpu"]

    def window(share: float, overlap: bool = False) -> bool:
        """Advance one window at ``share`` of CPU; the decision read at its end."""
        clock["now"] += w
        clock["cpu"] += share * w
        if overlap:
            load.overlapped()
        return load.offload(clock["now"], thread_cpu)

    load = sm.LoopLoad()
    assert load.offload(clock["now"], thread_cpu) is False  # the first look: no history, inline
    assert window(0.6) is False  # a loop with time to spare (C=1 over the network) stays inline
    reads = clock["reads"]
    for _ in range(50):  # within a window the CPU clock (a system call) is not read again
        assert load.offload(clock["now"] + sm.LOOP_WINDOW_S / 2, thread_cpu) is False
    assert clock["reads"] == reads
    assert window(0.95) is True  # saturated: offload
    assert window(0.75, overlap=True) is True  # concurrent requests merge; the batcher lowered the share
    assert window(0.75, overlap=True) is True
    assert window(0.3, overlap=True) is False  # the loop went quiet
    assert window(0.95) is True
    assert window(0.95) is False  # no overlap: a serial client, back inline ...
    backoff_windows = int(sm.LOOP_BACKOFF_S / w)
    for _ in range(backoff_windows - 1):
        assert window(0.95) is False  # ... and not offloaded again during the back-off
    for _ in range(2):
        if window(0.95):
            break
    else:
        raise AssertionError("offloading never resumed after the back-off")
