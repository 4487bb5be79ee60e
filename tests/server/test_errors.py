"""The error matrix: each bad request gets its precise status and message; a good request still succeeds."""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _tensor(arr: np.ndarray, dtype: int = pb.DATA_TYPE_FLOAT32, shape: list[int] | None = None) -> pb.Image:
    return pb.Image(
        tensor=pb.Tensor(dtype=dtype, shape=list(arr.shape) if shape is None else shape, data=arr.tobytes())
    )


def _png(size: tuple[int, int] = (8, 8), mode: str = "L") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


GOOD = np.random.default_rng(0).normal(size=(1, 1, 8, 8)).astype(np.float32)


def _cases() -> list[tuple[str, pb.ClassifyRequest, grpc.StatusCode, str]]:
    r = pb.ClassifyRequest
    png = _png()
    nan = GOOD.copy()
    nan[0, 0, 0, 0] = np.nan
    return [
        (
            "unknown model",
            r(model="nope", images=[_tensor(GOOD)]),
            grpc.StatusCode.NOT_FOUND,
            "model: no model named 'nope'; the repository has [",
        ),
        (
            "empty model name",
            r(images=[_tensor(GOOD)]),
            INVALID,
            "model: expected a model name, got an empty string",
        ),
        (
            "path traversal",
            r(model="../gray", images=[_tensor(GOOD)]),
            INVALID,
            "expected a model name matching",
        ),
        (
            "unknown version",
            r(model="gray", version=7, images=[_tensor(GOOD)]),
            grpc.StatusCode.NOT_FOUND,
            "model 'gray' has no version 7; served versions: [1, 2]",
        ),
        (
            "negative version",
            r(model="gray", version=-1, images=[_tensor(GOOD)]),
            INVALID,
            "version: expected a positive version or 0 for the latest, got -1",
        ),
        (
            "failed model",
            r(model="broken_onnx", images=[_tensor(GOOD)]),
            grpc.StatusCode.UNAVAILABLE,
            "model 'broken_onnx' has no ready version: version 1 is failed",
        ),
        (
            "config mismatch",
            r(model="mismatch", images=[_tensor(GOOD)]),
            grpc.StatusCode.UNAVAILABLE,
            "config lists 5 labels",
        ),
        ("empty batch", r(model="gray"), INVALID, "images: expected at least one image"),
        (
            "empty image",
            r(model="gray", images=[pb.Image()]),
            INVALID,
            "images[0]: expected encoded bytes or a tensor, got an empty image",
        ),
        (
            "zero-byte image",
            r(model="gray", images=[pb.Image(encoded=b"")]),
            INVALID,
            "images[0]: expected encoded image bytes (PNG, JPEG), got 0 bytes",
        ),
        (
            "not an image",
            r(model="gray", images=[pb.Image(encoded=png), pb.Image(encoded=b"hello world")]),
            INVALID,
            "images[1]: expected an image in one of PNG, JPEG",
        ),
        (
            "truncated png",
            r(model="gray", images=[pb.Image(encoded=png[: len(png) // 2])]),
            INVALID,
            "images[0]: image bytes are corrupt or truncated",
        ),
        (
            "wrong shape",
            r(model="gray", images=[_tensor(np.zeros((1, 3, 8, 8), np.float32))]),
            INVALID,
            "images[0].tensor: expected shape [1, 8, 8] or [N, 1, 8, 8], got [1, 3, 8, 8]",
        ),
        (
            "wrong byte length",
            r(model="gray", images=[_tensor(GOOD, shape=[2, 1, 8, 8])]),
            INVALID,
            "images[0].tensor: shape [2, 1, 8, 8] of float32 needs 512 bytes, got 256",
        ),
        (
            "unspecified dtype",
            r(model="gray", images=[_tensor(GOOD, dtype=pb.DATA_TYPE_UNSPECIFIED)]),
            INVALID,
            "images[0].tensor.dtype: expected one of",
        ),
        ("nan tensor", r(model="gray", images=[_tensor(nan)]), INVALID, "tensor holds NaN or Inf"),
        (
            "top_k negative",
            r(model="gray", top_k=-1, images=[_tensor(GOOD)]),
            INVALID,
            "top_k: expected 1..4 (the model's class count) or 0 for the default, got -1",
        ),
        (
            "top_k over class count",
            r(model="gray", top_k=5, images=[_tensor(GOOD)]),
            INVALID,
            "top_k: expected 1..4 (the model's class count) or 0 for the default, got 5",
        ),
        (
            "too many images",
            r(model="gray", images=[_tensor(GOOD)] * 5),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "images: 5 images in one request, over the limit of 4",
        ),
        (
            "too many tensor rows",
            r(model="gray", images=[_tensor(np.zeros((5, 1, 8, 8), np.float32))]),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "5 images in one request, over the limit of 4",
        ),
        (
            "decompression bomb",
            r(model="gray", images=[pb.Image(encoded=_png((200, 200)))]),
            INVALID,
            "images[0]: image is 200x200 = 40000 pixels, over the limit of 10000 pixels",
        ),
        (
            "format not allowed",
            r(model="gray", images=[pb.Image(encoded=_bmp())]),
            INVALID,
            "expected an image in one of PNG, JPEG",
        ),
    ]


def _bmp() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), 3).save(buf, format="BMP")
    return buf.getvalue()


def test_error_matrix_then_good_request(
    server_factory: Any, run_reference: Any, model_repository: Any
) -> None:
    # Small limits so the RESOURCE_EXHAUSTED and pixel cases are cheap to reach.
    limited = server_factory(
        max_images_per_request=4,
        max_message_bytes=64 * 1024,
        max_image_pixels=10_000,
        allowed_image_formats=("PNG", "JPEG"),
        metrics_port=-1,
    )
    with grpc.insecure_channel(limited.address) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        for name, request, code, text in _cases():
            with pytest.raises(grpc.RpcError) as err:
                stub.Classify(request, timeout=10)
            assert err.value.code() == code, (name, err.value.code(), err.value.details())
            assert text in err.value.details(), (name, err.value.details())
            assert "x-request-id" in dict(err.value.trailing_metadata() or ())
        # Oversize message: gRPC itself answers RESOURCE_EXHAUSTED before any handler runs.
        big = pb.ClassifyRequest(model="gray", images=[pb.Image(encoded=b"\0" * 100_000)])
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(big, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in err.value.details() or "exceeds" in err.value.details().lower()

        reply = stub.Classify(
            pb.ClassifyRequest(model="gray", version=1, images=[_tensor(GOOD)], top_k=1), timeout=10
        )
        logits = run_reference(model_repository / "gray" / "1" / "model.onnx", GOOD)
        assert reply.results[0].predictions[0].index == int(np.argmax(logits))


def _batch_count(handle: Any, model: str) -> float:
    return (
        handle.registry.get_sample_value("convserve_batch_size_count", {"model": model, "version": "1"})
        or 0.0
    )


def _dequeued(handle: Any, model: str) -> float:
    labels = {"model": model, "version": "1"}
    return handle.registry.get_sample_value("convserve_queue_wait_seconds_count", labels) or 0.0


def _wait_running(handle: Any, model: str, dequeued_before: float, timeout: float = 10.0) -> None:
    """Wait until the worker has taken one more request off the queue, i.e. it is now running."""
    deadline = time.monotonic() + timeout
    while _dequeued(handle, model) < dequeued_before + 1:
        if time.monotonic() > deadline:
            raise TimeoutError("request A never left the queue")
        time.sleep(0.002)


def test_deadline_honoured_and_expired_request_never_runs(server_factory: Any) -> None:
    """Request A occupies the one instance of 'slow'; B's 20 ms deadline passes in the queue: never run.

    A is 192 images, one run with batching off (~75 ms on a quiet box; 64 images took ~25 ms, which let
    B squeeze in under its deadline), so B, queued behind it, waits well past its deadline. A server of
    its own: on the session-wide one, work other tests left on 'slow' could add a run."""
    server = server_factory()
    big = np.random.default_rng(1).normal(size=(192, 3, 48, 48)).astype(np.float32)
    small = big[:1]
    with grpc.insecure_channel(server.address) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        stub.Classify(pb.ClassifyRequest(model="slow", images=[_tensor(small)]), timeout=30)  # warm up
        before = _batch_count(server, "slow")
        dequeued = _dequeued(server, "slow")
        with ThreadPoolExecutor(1) as pool:
            a = pool.submit(
                stub.Classify, pb.ClassifyRequest(model="slow", images=[_tensor(big)]), timeout=30
            )
            _wait_running(server, "slow", dequeued)  # A occupies the only instance before B is sent
            with pytest.raises(grpc.RpcError) as err:
                stub.Classify(pb.ClassifyRequest(model="slow", images=[_tensor(small)]), timeout=0.02)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert len(a.result(timeout=30).results) == 192
        # The run count is recorded before A's answer is sent: only A ran, B was dropped from the queue.
        assert _batch_count(server, "slow") - before == 1
        assert stub.Classify(pb.ClassifyRequest(model="slow", images=[_tensor(small)]), timeout=30).results


def test_undecodable_bytes_are_invalid_argument_not_unknown(channel: grpc.Channel) -> None:
    unary = channel.unary_unary(
        "/convserve.v1.Classifier/Classify",
        request_serializer=None,
        response_deserializer=pb.ClassifyResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as err:
        unary(b"\xff\xff\xff", timeout=10)
    assert err.value.code() == INVALID
    assert "expected a serialized convserve.v1.ClassifyRequest message" in err.value.details()
    stream = channel.stream_stream(
        "/convserve.v1.Classifier/ClassifyStream",
        request_serializer=None,
        response_deserializer=pb.ClassifyStreamResponse.FromString,
    )
    good = pb.ClassifyRequest(model="gray", images=[_tensor(GOOD)]).SerializeToString()
    replies = list(stream(iter([good, b"\xff\xff\xff", good]), timeout=10))
    assert [r.error_code for r in replies] == [
        0,
        INVALID.value[0],
        0,
    ]  # one bad message never ends the stream
    assert "do not parse" in replies[1].error_message
