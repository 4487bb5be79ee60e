"""KServe's own clients, unmodified, against convserve: ``kserve.InferenceRESTClient`` (protocol v2) and
``kserve.InferenceGRPCClient``: health, model readiness, and inference with JSON and binary tensors.

kserve pins protobuf and grpcio-tools versions that clash with tritonclient's (in .venv), so the clients
live in ``.venv-kserve`` (``make kserve-venv``, from scripts/kserve-requirements.txt) and run as a driver
subprocess; this test process compares what they saw with ONNX Runtime run in-process. KServe's clients
have no metadata calls (tritonclient's tests cover metadata).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from convserve.testing.prerequisites import unavailable

KSERVE_PYTHON = Path(__file__).resolve().parents[2] / ".venv-kserve" / "bin" / "python"
if not KSERVE_PYTHON.exists():
    unavailable("KServe's clients are not installed: run `make kserve-venv`", module_level=True)

DRIVER = r"""
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

rest_url, grpc_url, model, inputs = sys.argv[1:5]
x = np.load(inputs)


def request(binary, rid):
    inp = InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return InferRequest(model_name=model, infer_inputs=[inp], request_id=rid)


async def main():
    out = {}
    rest = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
    out["rest_live"] = await rest.is_server_live(rest_url)
    out["rest_ready"] = await rest.is_server_ready(rest_url)
    out["rest_model_ready"] = await rest.is_model_ready(rest_url, model)
    out["rest_unknown_ready"] = await rest.is_model_ready(rest_url, "no_such_model")
    for binary in (False, True):
        reply = await rest.infer(rest_url, request(binary, f"rest id #{binary}"), model_name=model)
        out[f"rest_binary_{binary}"] = [reply.id, reply.outputs[0].as_numpy().tolist()]
    await rest.close()
    grpc_client = InferenceGRPCClient(grpc_url, retries=0, timeout=30)
    out["grpc_live"] = await grpc_client.is_server_live()
    out["grpc_ready"] = await grpc_client.is_server_ready()
    out["grpc_model_ready"] = await grpc_client.is_model_ready(model)
    out["grpc_unknown_ready"] = await grpc_client.is_model_ready("no_such_model")
    reply = await grpc_client.infer(request(True, "grpc id {1}"))
    out["grpc"] = [reply.id, reply.outputs[0].as_numpy().tolist()]
    await grpc_client.close()
    print(json.dumps(out))


asyncio.run(main())
"""


def test_kserve_clients_drive_our_server(
    server_process: Any, ready_repository: Path, run_reference: Any, tmp_path: Path
) -> None:
    server = server_process("--model-repository", str(ready_repository))
    x = np.random.default_rng(5).normal(size=(4, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run(
        [str(KSERVE_PYTHON), "-c", DRIVER, server.http_url, server.address, "rgb", str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    seen = json.loads(done.stdout)
    for api in ("rest", "grpc"):
        assert seen[f"{api}_live"] is True and seen[f"{api}_ready"] is True, seen
        assert seen[f"{api}_model_ready"] is True and seen[f"{api}_unknown_ready"] is False, seen
    reference = run_reference(ready_repository / "rgb" / "1" / "model.onnx", x)
    for key, rid in (("rest_binary_False", "rest id #False"), ("rest_binary_True", "rest id #True"),
                     ("grpc", "grpc id {1}")):  # fmt: skip
        got_id, logits = seen[key]
        assert got_id == rid
        np.testing.assert_allclose(np.array(logits), reference, rtol=1e-5, atol=1e-6)
    assert server.stop() == 0
