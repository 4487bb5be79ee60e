"""The unmodified tritonclient[http] client against the REST front end: config, statistics, repository index,
load/unload behind auth, inference with JSON and binary tensors, classification.

tritonclient.http carries no protobuf stubs, so unlike the gRPC client it runs in this process; answers are
compared with ONNX Runtime run in-process and with the models' own config.json files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convserve.testing.prerequisites import unavailable

try:
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException
except ImportError:  # the dev extra installs it
    unavailable("tritonclient[http] is not installed (pip install -e '.[dev]')", module_level=True)

TOKEN = "rest-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def guarded(server_factory: Any) -> Any:
    """A server with bearer auth and model control on (it unloads and reloads models)."""
    return server_factory(auth_tokens=(TOKEN,), allow_model_control=True)


@pytest.fixture
def client(guarded: Any) -> Any:
    c = th.InferenceServerClient(f"127.0.0.1:{guarded.http_port}", network_timeout=30)
    yield c
    c.close()


def _failure(fn: Any) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as err:
        fn()
    return err.value.status(), err.value.message()


def test_health_and_metadata(client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()  # probes need no token
    meta = client.get_server_metadata(headers=AUTH)
    assert meta["name"] == "convserve"
    assert sorted(meta["extensions"]) == [
        "binary_tensor_data", "classification", "model_configuration", "model_repository", "statistics",
    ]  # fmt: skip
    assert client.is_model_ready("gray", headers=AUTH)
    assert not client.is_model_ready("mismatch", headers=AUTH)
    m = client.get_model_metadata("rgb", headers=AUTH)
    assert m["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 16, 16]}]


def test_model_config_as_triton_writes_it(client: Any, model_repository: Path) -> None:
    for name in ("rgb", "gray", "unbatched", "specific"):
        cfg = json.loads((model_repository / name / "config.json").read_text())
        got = client.get_model_config(name, headers=AUTH)
        assert got["name"] == name and got["platform"] == "onnxruntime_onnx"
        assert got["max_batch_size"] == cfg["max_batch_size"]
        (inp,) = got["input"]
        assert (inp["name"], inp["data_type"], inp["format"]) == ("input", "TYPE_FP32", "FORMAT_NCHW")
        assert inp["dims"] == cfg["input"]["shape"]  # numbers, as Triton's JSON has them
        assert got["output"][0]["dims"] == [len(cfg["labels"])]
        batched = cfg.get("batching", {}).get("enabled", True)
        assert ("max_queue_delay_microseconds" in got.get("dynamic_batching", {})) == batched
    assert client.get_model_config("specific", headers=AUTH)["version_policy"] == {
        "specific": {"versions": [1, 3]}
    }
    status, message = _failure(lambda: client.get_model_config("no_such_model", headers=AUTH))
    assert status == "404" and "no_such_model" in message


def test_config_matches_the_grpc_model_config(client: Any, guarded: Any) -> None:
    import grpc
    from google.protobuf import json_format

    from convserve.protos.inference import grpc_service_pb2 as pb
    from convserve.protos.inference import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(guarded.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        reply = stub.ModelConfig(
            pb.ModelConfigRequest(name="rgb"),
            metadata=(("authorization", AUTH["Authorization"]),),
            timeout=10,
        )
    rest = client.get_model_config("rgb", headers=AUTH)
    # The same message: parsing the REST JSON back gives exactly the gRPC answer.
    assert json_format.ParseDict(rest, type(reply.config)()) == reply.config


def test_infer_json_and_binary_tensors(client: Any, model_repository: Path, run_reference: Any) -> None:
    x = np.random.default_rng(0).normal(0, 1, (4, 1, 8, 8)).astype(np.float32)
    expected = run_reference(model_repository / "gray" / "2" / "model.onnx", x)
    for binary in (False, True):
        inp = th.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = th.InferRequestedOutput("logits", binary_data=binary)
        result = client.infer("gray", [inp], outputs=[out], headers=AUTH, request_id=f"b{binary}")
        np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-5)
        assert result.get_response()["id"] == f"b{binary}"
        assert ("data" in result.get_output("logits")) is not binary


def test_infer_png_bytes_with_classification(
    client: Any, model_repository: Path, run_reference: Any, encode_png: Any
) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (2, 8, 8), dtype=np.uint8)
    blobs = np.array([encode_png(p) for p in pixels], dtype=np.object_)
    inp = th.InferInput("input", [2], "BYTES")
    inp.set_data_from_numpy(blobs)
    result = client.infer(
        "gray", [inp], outputs=[th.InferRequestedOutput("logits", class_count=3)], headers=AUTH
    )
    rows = result.as_numpy("logits")
    assert rows.shape == (2, 3)
    x = ((pixels.astype(np.float32) / 255.0 - 0.5) / 0.25)[:, None]
    probs = _softmax(run_reference(model_repository / "gray" / "2" / "model.onnx", x))
    for i in range(2):
        score, index, label = rows[i][0].decode().split(":")
        assert int(index) == int(np.argmax(probs[i])) and label == f"class_{index}"
        assert float(score) == pytest.approx(float(probs[i].max()), abs=1e-5)


def test_inference_statistics_count_the_requests(client: Any) -> None:
    x = np.zeros((3, 3, 16, 16), np.float32)
    for _ in range(2):
        inp = th.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        client.infer("rgb", [inp], headers=AUTH)
    (stats,) = client.get_inference_statistics("rgb", headers=AUTH)["model_stats"]
    assert (stats["name"], stats["version"]) == ("rgb", "1")
    assert stats["inference_stats"]["success"]["count"] == 2
    assert stats["inference_count"] == 6 and stats["execution_count"] >= 1
    assert stats["inference_stats"]["compute_infer"]["ns"] > 0
    everything = client.get_inference_statistics(headers=AUTH)["model_stats"]
    assert {(s["name"], s["version"]) for s in everything} >= {("rgb", "1"), ("gray", "1"), ("gray", "2")}


def test_repository_index_and_load_unload_behind_auth(client: Any) -> None:
    index = client.get_model_repository_index(headers=AUTH)
    assert {"name": "rgb", "version": "1", "state": "READY", "reason": ""} in index
    assert any(row["name"] == "mismatch" and row["state"] == "UNAVAILABLE" for row in index)

    status, message = _failure(lambda: client.unload_model("rgb"))
    assert status == "401" and "bearer token" in message
    assert client.is_model_ready("rgb", headers=AUTH)

    client.unload_model("rgb", headers=AUTH)
    assert not client.is_model_ready("rgb", headers=AUTH)
    x = np.zeros((1, 3, 16, 16), np.float32)
    inp = th.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    status, _ = _failure(lambda: client.infer("rgb", [inp], headers=AUTH))
    assert status == "503"

    client.load_model("rgb", headers=AUTH)
    assert client.is_model_ready("rgb", headers=AUTH)
    assert client.infer("rgb", [inp], headers=AUTH).as_numpy("logits").shape == (1, 10)
    status, message = _failure(lambda: client.load_model("rgb", config='{"max_batch_size": 2}', headers=AUTH))
    assert status == "400" and "parameters" in message
    status, message = _failure(lambda: client.load_model("no_such_model", headers=AUTH))
    assert status == "404" and "no_such_model" in message


def test_load_unload_need_model_control(server: Any) -> None:
    c = th.InferenceServerClient(f"127.0.0.1:{server.http_port}", network_timeout=30)
    try:
        for fn in (lambda: c.load_model("rgb"), lambda: c.unload_model("rgb")):
            status, message = _failure(fn)
            assert status == "403" and "--allow-model-control" in message
        assert c.is_model_ready("rgb")
    finally:
        c.close()


def test_unserved_extensions_answer_501_naming_the_extension(client: Any) -> None:
    for fn, extension in [
        (lambda: client.get_system_shared_memory_status(headers=AUTH), "system_shared_memory"),
        (lambda: client.register_system_shared_memory("r", "/k", 64, headers=AUTH), "system_shared_memory"),
        (lambda: client.get_cuda_shared_memory_status(headers=AUTH), "cuda_shared_memory"),
        (lambda: client.get_trace_settings(headers=AUTH), "trace"),
        (lambda: client.get_trace_settings(model_name="gray", headers=AUTH), "trace"),
        (lambda: client.get_log_settings(headers=AUTH), "logging"),
    ]:
        status, message = _failure(fn)
        assert status == "501" and f"({extension})" in message, (status, message)
    assert client.is_model_ready("gray", headers=AUTH)
