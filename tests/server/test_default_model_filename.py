"""Triton's ``default_model_filename``: a version folder's graph under another name serves, is reported in the
model configuration, is watched by hot reload, and stays inside the repository boundary.

The reference is a fresh ONNX Runtime session on the same file, opened here without convserve.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from convserve.common.model_config import ModelConfigError
from convserve.protos.inference import grpc_service_pb2 as pb
from convserve.protos.inference import grpc_service_pb2_grpc as pb_grpc
from convserve.server.repository.config_source import read_model_config

PBTXT = 'platform: "onnxruntime_onnx"\nmax_batch_size: 4\ndefault_model_filename: "{name}"\n'
X = np.random.default_rng(11).normal(size=(2, 3, 16, 16)).astype(np.float32)


def _infer(stub: Any) -> np.ndarray:
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(X.shape))
    request = pb.ModelInferRequest(model_name="mnist", inputs=[tensor], raw_input_contents=[X.tobytes()])
    reply = stub.ModelInfer(request, timeout=30)
    return np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(X.shape[0], -1)


def test_default_model_filename_serves_reports_and_reloads(
    server_factory: Any, tmp_path: Path, make_model: Any, run_reference: Any
) -> None:
    folder = tmp_path / "repo" / "mnist"
    graph = make_model(folder / "1" / "mnist.onnx", channels=3, size=16, classes=5, seed=1)
    (folder / "config.pbtxt").write_text(PBTXT.format(name="mnist.onnx"))
    srv = server_factory(model_repository=str(folder.parent), repository_poll_seconds=0.2)
    with grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        np.testing.assert_allclose(_infer(stub), run_reference(graph, X), rtol=1e-5, atol=1e-6)
        config = stub.ModelConfig(pb.ModelConfigRequest(name="mnist"), timeout=10).config
        assert config.default_model_filename == "mnist.onnx"
        with urllib.request.urlopen(f"{srv.http_url}/v2/models/mnist/config", timeout=10) as r:
            assert json.load(r)["default_model_filename"] == "mnist.onnx"
        # Hot reload watches the named file: a new graph written beside and moved over it is served.
        staged = make_model(folder / "1" / "staged.tmp", channels=3, size=16, classes=5, seed=2)
        expected = run_reference(staged, X)
        staged.replace(graph)
        deadline = time.monotonic() + 15
        while not np.allclose(_infer(stub), expected, rtol=1e-5, atol=1e-6) and time.monotonic() < deadline:
            time.sleep(0.05)
        np.testing.assert_allclose(_infer(stub), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["../mnist.onnx", "1/mnist.onnx", "..", "sub\\\\mnist.onnx"])
def test_default_model_filename_outside_the_version_folder_is_refused_by_name(
    tmp_path: Path, make_model: Any, name: str
) -> None:
    folder = tmp_path / "mnist"
    make_model(folder / "1" / "mnist.onnx", channels=3, size=16, classes=5)
    (folder / "config.pbtxt").write_text(PBTXT.format(name=name))
    with pytest.raises(ModelConfigError, match="default_model_filename must be a file name") as err:
        read_model_config(folder)
    assert repr(name.replace("\\\\", "\\")) in str(err.value)


def test_default_model_filename_linked_out_of_the_folder_is_refused(tmp_path: Path, make_model: Any) -> None:
    outside = make_model(tmp_path / "elsewhere" / "mnist.onnx", channels=3, size=16, classes=5)
    folder = tmp_path / "mnist"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "mnist.onnx").symlink_to(outside)
    (folder / "config.pbtxt").write_text(PBTXT.format(name="mnist.onnx"))
    with pytest.raises(ModelConfigError, match=r"model file .*mnist.onnx is a symlink"):
        read_model_config(folder)
