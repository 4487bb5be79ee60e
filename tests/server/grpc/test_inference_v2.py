"""KServe v2 (inference.GRPCInferenceService) against a real server, through our own stubs."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from convserve.protos.inference import grpc_service_pb2 as pb

from ..rest.rest_client import bytes_elements


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _fp32_request(x: np.ndarray, model: str = "gray", version: str = "", raw: bool = True, **kw: Any) -> Any:
    inp = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(x.shape))
    request = pb.ModelInferRequest(model_name=model, model_version=version, inputs=[inp], **kw)
    if raw:
        request.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        request.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
    return request


def test_model_ready_answers_false_for_unknown_models_and_versions_as_triton_does(v2: Any) -> None:
    # tritonclient's and KServe's is_model_ready raise on an error status: "not ready" is ready=false, OK.
    for name, version in (("nope", ""), ("nope", "3"), ("gray", "7"), ("latest", "1"), ("mismatch", "")):
        reply, call = v2.ModelReady.with_call(pb.ModelReadyRequest(name=name, version=version))
        assert call.code() == grpc.StatusCode.OK and not reply.ready, (name, version)
    with pytest.raises(grpc.RpcError) as err:  # a malformed version is still the client's mistake
        v2.ModelReady(pb.ModelReadyRequest(name="gray", version="x"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "version" in err.value.details()
    assert v2.ModelReady(pb.ModelReadyRequest(name="gray", version="2")).ready


def test_server_status_and_metadata(v2: Any) -> None:
    assert v2.ServerLive(pb.ServerLiveRequest()).live
    assert v2.ServerReady(pb.ServerReadyRequest()).ready
    meta = v2.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "convserve" and "classification" in meta.extensions
    assert v2.ModelReady(pb.ModelReadyRequest(name="gray")).ready
    assert v2.ModelReady(pb.ModelReadyRequest(name="gray", version="1")).ready
    assert not v2.ModelReady(pb.ModelReadyRequest(name="mismatch")).ready
    assert not v2.ModelReady(pb.ModelReadyRequest(name="latest", version="1")).ready
    m = v2.ModelMetadata(pb.ModelMetadataRequest(name="rgb"))
    assert (m.name, list(m.versions), m.platform) == ("rgb", ["1"], "onnxruntime_onnx")
    assert (m.inputs[0].name, m.inputs[0].datatype, list(m.inputs[0].shape)) == (
        "input",
        "FP32",
        [-1, 3, 16, 16],
    )
    assert (m.outputs[0].name, m.outputs[0].datatype, list(m.outputs[0].shape)) == (
        "logits",
        "FP32",
        [-1, 10],
    )
    assert list(v2.ModelMetadata(pb.ModelMetadataRequest(name="gray")).versions) == ["1", "2"]


@pytest.mark.parametrize("raw", [True, False], ids=["raw_input_contents", "fp32_contents"])
def test_infer_fp32_matches_reference(v2: Any, model_repository: Path, run_reference: Any, raw: bool) -> None:
    x = np.random.default_rng(0).normal(size=(6, 1, 8, 8)).astype(np.float32)
    reply = v2.ModelInfer(_fp32_request(x, version="1", raw=raw, id="req-7"))
    assert (reply.model_name, reply.model_version, reply.id) == ("gray", "1", "req-7")
    (out,) = reply.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("logits", "FP32", [6, 4])
    got = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(6, 4)
    np.testing.assert_allclose(
        got, run_reference(model_repository / "gray" / "1" / "model.onnx", x), rtol=1e-5, atol=1e-6
    )


def test_classification_extension(v2: Any, model_repository: Path, run_reference: Any) -> None:
    x = np.random.default_rng(1).normal(size=(3, 3, 16, 16)).astype(np.float32)
    request = _fp32_request(x, model="rgb")
    out = request.outputs.add(name="logits")
    out.parameters["classification"].int64_param = 3
    reply = v2.ModelInfer(request)
    assert (reply.outputs[0].datatype, list(reply.outputs[0].shape)) == ("BYTES", [3, 3])
    strings = [s.decode() for s in bytes_elements(reply.raw_output_contents[0])]
    probs = _softmax(run_reference(model_repository / "rgb" / "1" / "model.onnx", x))
    for row in range(3):
        order = np.argsort(-probs[row])[:3]
        for j, text in enumerate(strings[row * 3 : row * 3 + 3]):
            score, index, label = text.split(":")
            assert int(index) == order[j] and label == f"class_{order[j]}"
            assert float(score) == pytest.approx(probs[row, order[j]], abs=1e-5)
    # The same through a request-level parameter, with no outputs named.
    request = _fp32_request(x, model="rgb")
    request.parameters["classification"].int64_param = 2
    reply = v2.ModelInfer(request)
    assert list(reply.outputs[0].shape) == [3, 2]
    assert len(bytes_elements(reply.raw_output_contents[0])) == 6


def test_bytes_input_of_encoded_images(
    v2: Any, model_repository: Path, run_reference: Any, encode_png: Any
) -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (2, 8, 8), dtype=np.uint8)
    pngs = [encode_png(p) for p in pixels]
    inp = pb.ModelInferRequest.InferInputTensor(name="input", datatype="BYTES", shape=[2])
    request = pb.ModelInferRequest(model_name="gray", model_version="2", inputs=[inp])
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(p)) + p for p in pngs))
    reply = v2.ModelInfer(request)
    got = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(2, 4)
    x = ((pixels.astype(np.float32) / 255 - 0.5) / 0.25)[:, None]
    np.testing.assert_allclose(
        got, run_reference(model_repository / "gray" / "2" / "model.onnx", x), rtol=1e-4, atol=1e-5
    )
    # Typed bytes_contents work too.
    inp = pb.ModelInferRequest.InferInputTensor(name="input", datatype="BYTES", shape=[2, 1])
    inp.contents.bytes_contents.extend(pngs)
    reply2 = v2.ModelInfer(pb.ModelInferRequest(model_name="gray", model_version="2", inputs=[inp]))
    assert reply2.raw_output_contents[0] == reply.raw_output_contents[0]


def test_stream_infer_with_error_in_the_middle(v2: Any, model_repository: Path, run_reference: Any) -> None:
    xs = np.random.default_rng(3).normal(size=(5, 1, 1, 8, 8)).astype(np.float32)
    requests = [_fp32_request(x, version="1", id=f"s{i}") for i, x in enumerate(xs)]
    requests.insert(2, _fp32_request(xs[0], model="nope", id="bad"))
    replies = list(v2.ModelStreamInfer(iter(requests), timeout=30))
    assert [r.infer_response.id for r in replies] == ["s0", "s1", "bad", "s2", "s3", "s4"]
    assert replies[2].error_message.startswith("NOT_FOUND:") and "'nope'" in replies[2].error_message
    ref = run_reference(model_repository / "gray" / "1" / "model.onnx", xs[:, 0])
    good = [r for r in replies if not r.error_message]
    for r, expected in zip(good, ref, strict=False):
        np.testing.assert_allclose(
            np.frombuffer(r.infer_response.raw_output_contents[0], dtype="<f4"),
            expected,
            rtol=1e-5,
            atol=1e-6,
        )


def test_v2_errors(v2: Any) -> None:
    x = np.zeros((1, 1, 8, 8), dtype=np.float32)
    cases = [
        (_fp32_request(x, model="nope"), grpc.StatusCode.NOT_FOUND, "no model named 'nope'"),
        (_fp32_request(x, version="9"), grpc.StatusCode.NOT_FOUND, "has no version 9"),
        (
            _fp32_request(x, version="x1"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "model_version: expected a positive integer",
        ),
        (_fp32_request(x, model="mismatch"), grpc.StatusCode.UNAVAILABLE, "has no ready version"),
        (
            _fp32_request(np.zeros((1, 1, 8, 9), np.float32)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "expected shape [1, 8, 8] or [N, 1, 8, 8], got [1, 1, 8, 9]",
        ),
        (
            _fp32_request(np.zeros((8, 8), np.float32)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "expected [N, 1, 8, 8], got [8, 8]",
        ),
    ]
    wrong_len = _fp32_request(x)
    wrong_len.raw_input_contents[0] = b"\0" * 10
    cases.append((wrong_len, grpc.StatusCode.INVALID_ARGUMENT, "needs 256 bytes, got 10"))
    wrong_type = _fp32_request(x)
    wrong_type.inputs[0].datatype = "INT8"
    cases.append((wrong_type, grpc.StatusCode.INVALID_ARGUMENT, "expected FP32"))
    wrong_name = _fp32_request(x)
    wrong_name.inputs[0].name = "pixels"
    cases.append(
        (wrong_name, grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].name: expected 'input', got 'pixels'")
    )
    bad_out = _fp32_request(x)
    bad_out.outputs.add(name="probs")
    cases.append(
        (bad_out, grpc.StatusCode.INVALID_ARGUMENT, "outputs[0].name: expected 'logits', got 'probs'")
    )
    bad_k = _fp32_request(x)
    bad_k.outputs.add(name="logits").parameters["classification"].int64_param = 99
    cases.append((bad_k, grpc.StatusCode.INVALID_ARGUMENT, "expected 1..4"))
    truncated = pb.ModelInferRequest(
        model_name="gray",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="BYTES", shape=[1])],
    )
    truncated.raw_input_contents.append(struct.pack("<I", 100) + b"abc")
    cases.append((truncated, grpc.StatusCode.INVALID_ARGUMENT, "claims 100 bytes, only 3 remain"))
    for request, code, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            v2.ModelInfer(request)
        assert err.value.code() == code, (text, err.value.details())
        assert text in err.value.details()
    assert v2.ModelInfer(_fp32_request(x)).raw_output_contents  # still serving
