"""convserve.v1 Classifier against a real server: answers equal an independent ONNX Runtime run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from convserve.protos.convserve.v1 import classifier_pb2 as pb


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _normalized(pixels: np.ndarray, mean: float = 0.5, std: float = 0.25) -> np.ndarray:
    """What the server's preprocessing must produce for already-sized images: (x/255 - mean) / std."""
    return ((pixels.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def _tensor(arr: np.ndarray, dtype: int = pb.DATA_TYPE_FLOAT32) -> pb.Image:
    return pb.Image(tensor=pb.Tensor(dtype=dtype, shape=list(arr.shape), data=arr.tobytes()))


def _check(result: pb.Classification, probs: np.ndarray, k: int, labels: list[str] | None = None) -> None:
    order = np.argsort(-probs, kind="stable")[:k]
    got = [p.index for p in result.predictions]
    assert got == order.tolist()
    np.testing.assert_allclose(
        [p.probability for p in result.predictions], probs[order], rtol=1e-4, atol=1e-6
    )
    assert [p.label for p in result.predictions] == [f"class_{i}" for i in order]


def test_encoded_png_batch_matches_reference(
    classifier: Any, model_repository: Path, run_reference: Any, encode_png: Any
) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 8, 8), dtype=np.uint8)
    request = pb.ClassifyRequest(
        model="gray", version=1, top_k=3, images=[pb.Image(encoded=encode_png(p)) for p in pixels]
    )
    reply = classifier.Classify(request)
    assert (reply.model, reply.version, len(reply.results)) == ("gray", 1, 5)
    expected = _softmax(
        run_reference(model_repository / "gray" / "1" / "model.onnx", _normalized(pixels)[:, None])
    )
    for result, probs in zip(reply.results, expected, strict=False):
        _check(result, probs, 3)


def test_rgb_jpeg_and_resize(classifier: Any, model_repository: Path, run_reference: Any) -> None:
    """A 40x24 RGB JPEG is decoded and resized to the model's 16x16 input; the answer is the model's."""
    import io

    from PIL import Image

    from convserve.common.model_config import load_config
    from convserve.server.runtime.preprocess import image_to_array

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    reply = classifier.Classify(
        pb.ClassifyRequest(model="rgb", images=[pb.Image(encoded=buf.getvalue())], top_k=10)
    )
    # Decoding goes through the same documented preprocessing function training uses.
    cfg = load_config(model_repository / "rgb")
    x = image_to_array(Image.open(io.BytesIO(buf.getvalue())), cfg)[None]
    probs = _softmax(run_reference(model_repository / "rgb" / "1" / "model.onnx", x))[0]
    _check(reply.results[0], probs, 10)
    assert abs(sum(p.probability for p in reply.results[0].predictions) - 1.0) < 1e-4


def test_raw_tensors_float32_uint8_and_nchw(
    classifier: Any, model_repository: Path, run_reference: Any
) -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 1, 8, 8)).astype(np.float32)
    pixels = rng.integers(0, 256, (1, 8, 8), dtype=np.uint8)
    images = [
        _tensor(x[0]),
        _tensor(x[1:]),
        _tensor(pixels, pb.DATA_TYPE_UINT8),
        _tensor(x[0].astype(np.float64), pb.DATA_TYPE_FLOAT64),
    ]
    reply = classifier.Classify(pb.ClassifyRequest(model="gray", version=2, images=images, top_k=4))
    assert len(reply.results) == 5  # a [2, C, H, W] tensor counts as two images
    batch = np.concatenate([x, _normalized(pixels)[None], x[:1]])
    expected = _softmax(run_reference(model_repository / "gray" / "2" / "model.onnx", batch))
    for result, probs in zip(reply.results, expected, strict=False):
        _check(result, probs, 4)


def test_default_top_k_and_probabilities_model(
    classifier: Any, model_repository: Path, run_reference: Any
) -> None:
    x = np.random.default_rng(3).normal(size=(1, 1, 8, 8)).astype(np.float32)
    reply = classifier.Classify(pb.ClassifyRequest(model="gray", images=[_tensor(x)]))
    assert len(reply.results[0].predictions) == 4  # default 5, capped at the 4 classes
    # A model whose graph ends in Softmax: its outputs are used as they are (no second softmax).
    reply = classifier.Classify(pb.ClassifyRequest(model="probs", images=[_tensor(x)], top_k=2))
    probs = run_reference(model_repository / "probs" / "1" / "model.onnx", x)[0]
    _check(reply.results[0], probs, 2)


def test_versions_and_policies(classifier: Any, model_repository: Path, run_reference: Any) -> None:
    x = np.random.default_rng(4).normal(size=(1, 1, 8, 8)).astype(np.float32)

    def top(model: str, version: int = 0) -> tuple[int, float]:
        r = classifier.Classify(
            pb.ClassifyRequest(model=model, version=version, images=[_tensor(x)], top_k=1)
        )
        return r.version, r.results[0].predictions[0].probability

    def ref(model: str, version: int) -> float:
        return float(_softmax(run_reference(model_repository / model / str(version) / "model.onnx", x)).max())

    assert top("gray")[0] == 2  # latest ready
    for v in (1, 2):
        version, p = top("gray", v)
        assert version == v and p == pytest.approx(ref("gray", v), rel=1e-4)
    assert top("latest")[0] == 3
    assert top("specific")[0] == 3
    assert top("specific", 1)[0] == 1
    for model, version in (("latest", 1), ("latest", 2), ("specific", 2)):
        with pytest.raises(grpc.RpcError) as err:
            top(model, version)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert f"has no version {version}" in err.value.details() and "served versions" in err.value.details()


def test_list_and_describe(classifier: Any) -> None:
    models = {m.name: m for m in classifier.ListModels(pb.ListModelsRequest()).models}
    assert {"gray", "rgb", "latest", "specific", "probs", "mismatch", "broken_onnx", "bad_config"} <= set(
        models
    )
    assert [v.version for v in models["latest"].versions] == [3]
    assert [v.version for v in models["specific"].versions] == [1, 3]
    assert all(v.state == pb.MODEL_STATE_READY for v in models["gray"].versions)
    for broken in ("mismatch", "broken_onnx", "bad_config", "no_file"):
        (status,) = models[broken].versions
        assert status.state == pb.MODEL_STATE_FAILED and status.reason
    assert "5" in models["mismatch"].versions[0].reason  # says what the config claims vs the graph

    d = classifier.DescribeModel(pb.DescribeModelRequest(model="rgb"))
    assert (d.name, d.version, d.ready, d.max_batch_size) == ("rgb", 1, True, 16)
    assert list(d.input.shape) == [3, 16, 16] and d.input.color_mode == "RGB" and d.input.name == "input"
    assert list(d.labels) == [f"class_{i}" for i in range(10)]
    assert d.execution_provider == "CPUExecutionProvider"
    assert d.batching.enabled and d.batching.max_queue_size == 1024 and d.batching.instances == 1
    d = classifier.DescribeModel(pb.DescribeModelRequest(model="gray", version=1))
    assert d.version == 1
    d = classifier.DescribeModel(pb.DescribeModelRequest(model="unbatched"))
    assert not d.batching.enabled
    d = classifier.DescribeModel(pb.DescribeModelRequest(model="mismatch"))
    assert not d.ready and d.versions[0].state == pb.MODEL_STATE_FAILED


def test_stream_in_order_with_per_message_errors(
    classifier: Any, model_repository: Path, run_reference: Any
) -> None:
    rng = np.random.default_rng(5)
    xs = rng.normal(size=(12, 1, 8, 8)).astype(np.float32)
    requests = []
    for i, x in enumerate(xs):
        if i == 4:
            requests.append(pb.ClassifyRequest(model="nope", images=[_tensor(x)], request_id="bad-model"))
        if i == 7:
            requests.append(
                pb.ClassifyRequest(model="gray", images=[pb.Image(encoded=b"junk")], request_id="bad-img")
            )
        requests.append(
            pb.ClassifyRequest(model="gray", version=1, images=[_tensor(x)], top_k=1, request_id=f"r{i}")
        )
    replies = list(classifier.ClassifyStream(iter(requests), timeout=30))
    assert [r.request_id for r in replies] == [r.request_id for r in requests]
    expected = _softmax(run_reference(model_repository / "gray" / "1" / "model.onnx", xs))
    good = [r for r in replies if not r.error_code]
    assert len(good) == 12
    for reply, probs in zip(good, expected, strict=False):
        assert reply.response.results[0].predictions[0].index == int(np.argmax(probs))
    errors = {r.request_id: r for r in replies if r.error_code}
    assert errors["bad-model"].error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "no model named 'nope'" in errors["bad-model"].error_message
    assert errors["bad-img"].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "images[0]" in errors["bad-img"].error_message


def test_request_id_echoed(classifier: Any) -> None:
    x = np.zeros((1, 1, 8, 8), dtype=np.float32)
    reply, call = classifier.Classify.with_call(
        pb.ClassifyRequest(model="gray", images=[_tensor(x)]), metadata=(("x-request-id", "abc-123"),)
    )
    assert reply.request_id == "abc-123"
    assert ("x-request-id", "abc-123") in tuple(call.trailing_metadata())
    _, call = classifier.Classify.with_call(pb.ClassifyRequest(model="gray", images=[_tensor(x)]))
    generated = dict(call.trailing_metadata())["x-request-id"]
    assert len(generated) >= 16
