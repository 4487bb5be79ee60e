"""Triton's gRPC extensions driven by unmodified tritonclient: model config, repository index, load/unload
behind auth, and the extensions we do not serve answering UNIMPLEMENTED by name.

tritonclient runs in a child process (its stubs and ours register the same protobuf names); the server is
another child process. This process only compares what the driver saw with the models' config.json files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from convserve.protos.inference import grpc_service_pb2 as pb
from convserve.protos.inference import grpc_service_pb2_grpc as pb_grpc
from convserve.testing.prerequisites import require_module

require_module("tritonclient", "tritonclient[grpc] is not installed (pip install -e '.[dev]')")

TOKEN = "triton-test-token"

DRIVER = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

url, token = sys.argv[1:3]
auth = {"authorization": f"Bearer {token}"}
client = tc.InferenceServerClient(url)
out = {}

def attempt(name, fn):
    try:
        out[name] = ["ok", fn()]
    except InferenceServerException as exc:
        out[name] = [exc.status(), exc.message()]

out["server"] = client.get_server_metadata(headers=auth, as_json=True)
for model in ("rgb", "gray", "specific", "unbatched"):
    out[f"config_{model}"] = client.get_model_config(model, headers=auth, as_json=True)
attempt("config_missing", lambda: client.get_model_config("no_such_model", headers=auth))
attempt("config_bad_version", lambda: client.get_model_config("rgb", model_version="7", headers=auth))
out["index"] = client.get_model_repository_index(headers=auth, as_json=True)

attempt("unload_no_token", lambda: client.unload_model("rgb"))
client.unload_model("rgb", headers=auth)
out["ready_after_unload"] = client.is_model_ready("rgb", headers=auth)
out["index_after_unload"] = client.get_model_repository_index(headers=auth, as_json=True)
attempt("infer_after_unload", lambda: client.infer(
    "rgb", [tc.InferInput("input", [1, 3, 16, 16], "FP32").set_data_from_numpy(
        np.zeros((1, 3, 16, 16), np.float32))], headers=auth))
client.load_model("rgb", headers=auth)
out["ready_after_load"] = client.is_model_ready("rgb", headers=auth)
x = np.zeros((2, 3, 16, 16), np.float32)
inp = tc.InferInput("input", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
out["infer_after_load"] = list(client.infer("rgb", [inp], headers=auth).as_numpy("logits").shape)
out["stats_rgb"] = client.get_inference_statistics("rgb", headers=auth, as_json=True)
out["stats_all"] = client.get_inference_statistics(headers=auth, as_json=True)
attempt("stats_missing", lambda: client.get_inference_statistics("no_such_model", headers=auth))
attempt("load_missing", lambda: client.load_model("no_such_model", headers=auth))
attempt("load_with_config", lambda: client.load_model("rgb", config='{"max_batch_size": 2}', headers=auth))

attempt("system_shm", lambda: client.get_system_shared_memory_status(headers=auth))
attempt("system_shm_register", lambda: client.register_system_shared_memory("r", "/k", 64, headers=auth))
attempt("cuda_shm", lambda: client.get_cuda_shared_memory_status(headers=auth))
attempt("trace", lambda: client.get_trace_settings(headers=auth))
attempt("log", lambda: client.get_log_settings(headers=auth))
print(json.dumps(out))
"""


def _drive(address: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, address, TOKEN], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _expected_config(repo: Path, name: str) -> dict[str, Any]:
    """What get_model_config must say, computed from the model's own config.json and server defaults."""
    cfg = json.loads((repo / name / "config.json").read_text())
    c, h, w = cfg["input"]["shape"]
    batching = cfg.get("batching", {})
    policy = cfg.get("version_policy", {})
    expected: dict[str, Any] = {
        "name": name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": cfg["max_batch_size"],
        "input": [
            {
                "name": "input",
                "data_type": "TYPE_FP32",
                "format": "FORMAT_NCHW",
                "dims": [str(c), str(h), str(w)],
            }
        ],
        "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [str(len(cfg["labels"]))]}],
    }
    if policy.get("specific"):
        expected["version_policy"] = {"specific": {"versions": [str(v) for v in policy["specific"]]}}
    else:
        expected["version_policy"] = {"latest": {"num_versions": policy.get("latest") or 1}}
    if batching.get("enabled", True):
        expected["dynamic_batching"] = {"default_queue_policy": {"max_queue_size": 1024}}
    else:
        expected["dynamic_batching"] = None
    return expected


def test_tritonclient_model_config_repository_and_unserved_extensions(
    server_process: Any, model_repository: Path, tmp_path: Path
) -> None:
    (tmp_path / "tokens").write_text(TOKEN + "\n")
    server = server_process(
        "--model-repository",
        str(model_repository),
        "--no-strict-readiness",
        "--allow-model-control",
        "--auth-token-file",
        str(tmp_path / "tokens"),
    )
    seen = _drive(server.address)

    served = ["classification", "model_configuration", "model_repository", "statistics"]
    assert sorted(seen["server"]["extensions"]) == served

    for model in ("rgb", "gray", "specific", "unbatched"):
        got, want = seen[f"config_{model}"]["config"], _expected_config(model_repository, model)
        for key, value in want.items():
            if key == "dynamic_batching" and value is None:
                assert key not in got, (model, got)
            elif key == "dynamic_batching":
                assert got[key]["default_queue_policy"] == value["default_queue_policy"], (model, got)
            else:
                assert got[key] == value, (model, key, got.get(key))
        assert got["instance_group"][0]["count"] == 1 and got["instance_group"][0]["kind"] == "KIND_CPU"
    status, message = seen["config_missing"]
    assert "NOT_FOUND" in status and "no model named 'no_such_model'" in message
    status, message = seen["config_bad_version"]
    assert "NOT_FOUND" in status and "no version 7" in message

    rows = {(m["name"], m.get("version", "")): m for m in seen["index"]["models"]}
    on_disk = sorted(p.name for p in model_repository.iterdir() if p.is_dir())
    assert sorted({name for name, _ in rows}) == on_disk
    assert rows[("rgb", "1")]["state"] == "READY"
    assert {v for n, v in rows if n == "specific"} == {"1", "3"}  # policy, not disk

    status, message = seen["unload_no_token"]
    assert "UNAUTHENTICATED" in status and "bearer token" in message
    assert seen["ready_after_unload"] is False
    after = {(m["name"], m.get("version", "")): m for m in seen["index_after_unload"]["models"]}
    assert after[("rgb", "")]["state"] == "UNAVAILABLE" and ("rgb", "1") not in after
    assert "UNAVAILABLE" in seen["infer_after_unload"][0]
    assert seen["ready_after_load"] is True and seen["infer_after_load"] == [2, 10]
    # The reloaded version counted the one 2-image request it ran since it loaded.
    (stats,) = seen["stats_rgb"]["model_stats"]
    assert stats["name"] == "rgb" and stats["version"] == "1"
    assert int(stats["inference_count"]) == 2 and int(stats["execution_count"]) >= 1
    infer = stats["inference_stats"]
    assert int(infer["success"]["count"]) == 1 and int(infer["success"]["ns"]) > 0
    assert int(infer["compute_infer"]["count"]) >= 1 and int(infer["compute_infer"]["ns"]) > 0
    assert int(stats["last_inference"]) > 0
    assert {"rgb", "gray"} <= {m["name"] for m in seen["stats_all"]["model_stats"]}
    status, message = seen["stats_missing"]
    assert "NOT_FOUND" in status and "no_such_model" in message
    status, message = seen["load_missing"]
    assert "NOT_FOUND" in status and "no_such_model" in message
    status, message = seen["load_with_config"]
    assert "INVALID_ARGUMENT" in status and "takes no parameters" in message and "config" in message

    for key, extension in [
        ("system_shm", "system_shared_memory"),
        ("system_shm_register", "system_shared_memory"),
        ("cuda_shm", "cuda_shared_memory"),
        ("trace", "trace"),
        ("log", "logging"),
    ]:
        status, message = seen[key]
        assert "UNIMPLEMENTED" in status and f"({extension})" in message, (key, status, message)
    assert server.stop() == 0


def test_repository_control_is_refused_without_model_control(server: Any) -> None:
    """The same gate as LoadModel/UnloadModel: off unless --allow-model-control; the server keeps serving."""
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for call, request in [
            (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="rgb")),
            (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="rgb")),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=10)
            assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert "--allow-model-control" in (err.value.details() or "")
        # Statistics are read-only: served without model control.
        (stats,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name="rgb"), timeout=10).model_stats
        assert stats.name == "rgb" and stats.version == "1"
        assert stub.ModelReady(pb.ModelReadyRequest(name="rgb"), timeout=10).ready
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=10)
        assert index.models and all(m.state == "READY" for m in index.models)
