"""Triton's ``max_batch_size: 0``: the model has no batch dimension; its input is exactly the config's dims.

``dims: [1, 1, 8, 8]`` takes one image and refuses two by naming the shape; ``dims: [-1, 1, 8, 8]`` takes
any count. Both are reported as max_batch_size 0 with the dims as written, and each request runs alone. The
reference is a fresh ONNX Runtime session on the same file, opened here without convserve.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from convserve.protos.inference import grpc_service_pb2 as pb
from convserve.protos.inference import grpc_service_pb2_grpc as pb_grpc

PBTXT = """
platform: "onnxruntime_onnx"
max_batch_size: 0
input [ {{ name: "input", data_type: TYPE_FP32, dims: [ {b}, 1, 8, 8 ] }} ]
output [ {{ name: "logits", data_type: TYPE_FP32, dims: [ {b}, 4 ] }} ]
"""
RNG = np.random.default_rng(17)


def _request(model: str, x: np.ndarray) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(x.shape))
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[x.tobytes()])


def _logits(reply: pb.ModelInferResponse, n: int) -> np.ndarray:
    return np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(n, -1)


@pytest.fixture
def unbatched(server_factory: Any, tmp_path: Path, make_model: Any) -> tuple[Any, dict[str, Path]]:
    repo = tmp_path / "repo"
    graphs = {}
    for name, b in (("one", 1), ("any", -1)):
        graphs[name] = make_model(repo / name / "1" / "model.onnx", seed=len(name))
        (repo / name / "config.pbtxt").write_text(PBTXT.format(b=b))
    return server_factory(model_repository=str(repo)), graphs


def test_max_batch_size_zero_takes_exactly_the_dims(
    unbatched: tuple[Any, dict[str, Path]], run_reference: Any
) -> None:
    srv, graphs = unbatched
    with grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for name, b in (("one", 1), ("any", -1)):
            config = stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=10).config
            assert config.max_batch_size == 0
            assert list(config.input[0].dims) == [b, 1, 8, 8] and list(config.output[0].dims) == [b, 4]
            assert not config.HasField("dynamic_batching")
            meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=10)
            assert list(meta.inputs[0].shape) == [b, 1, 8, 8] and list(meta.outputs[0].shape) == [b, 4]
        x1 = RNG.normal(size=(1, 1, 8, 8)).astype(np.float32)
        reply = stub.ModelInfer(_request("one", x1), timeout=30)
        np.testing.assert_allclose(_logits(reply, 1), run_reference(graphs["one"], x1), rtol=1e-5, atol=1e-6)
        x2 = RNG.normal(size=(2, 1, 8, 8)).astype(np.float32)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(_request("one", x2), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "expected shape [1, 1, 8, 8]" in err.value.details() and "got 2 images" in err.value.details()
        x3 = RNG.normal(size=(3, 1, 8, 8)).astype(np.float32)
        reply = stub.ModelInfer(_request("any", x3), timeout=30)
        np.testing.assert_allclose(_logits(reply, 3), run_reference(graphs["any"], x3), rtol=1e-5, atol=1e-6)
        # Each request runs alone: eight concurrent single images are eight executions of one image.
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: stub.ModelInfer(_request("any", x1), timeout=30), range(8)))
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="any"), timeout=10).model_stats[0]
        assert (stats.execution_count, stats.inference_count) == (1 + 8, 3 + 8)
        assert sorted(b.batch_size for b in stats.batch_stats) == [1, 3]
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready  # still serving
    tensor = {"name": "input", "datatype": "FP32", "shape": [2, 1, 8, 8], "data": x2.ravel().tolist()}
    body = {"inputs": [tensor]}
    post = urllib.request.Request(
        f"{srv.http_url}/v2/models/one/infer", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as rest_err:
        urllib.request.urlopen(post, timeout=30)
    assert rest_err.value.code == 400
    assert "expected shape [1, 1, 8, 8]" in json.load(rest_err.value)["error"]
