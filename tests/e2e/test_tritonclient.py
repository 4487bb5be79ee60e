"""The unmodified tritonclient[grpc] client against our v2 service.

tritonclient's stubs register the same ``inference.*`` protobuf names as ours, and two definitions collide
in one process. So the server runs as a subprocess and tritonclient runs in another one (the driver
below); this test process only compares what the driver saw with ONNX Runtime run in-process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convserve.testing.prerequisites import require_module

# find_spec, not importorskip: importing tritonclient here would collide with our own inference stubs.
require_module("tritonclient", "tritonclient[grpc] is not installed (pip install -e '.[dev]')")

DRIVER = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

url, model, inputs = sys.argv[1:4]
x = np.load(inputs)
client = tc.InferenceServerClient(url)
out = {"live": client.is_server_live(), "ready": client.is_server_ready(),
       "model_ready": client.is_model_ready(model),
       "metadata": client.get_model_metadata(model, as_json=True),
       "server": client.get_server_metadata(as_json=True)}
for n in (1, 8):
    inp = tc.InferInput("input", list(x[:n].shape), "FP32")
    inp.set_data_from_numpy(x[:n])
    result = client.infer(model, [inp], outputs=[tc.InferRequestedOutput("logits")])
    out[f"batch{n}"] = result.as_numpy("logits").tolist()
inp = tc.InferInput("input", list(x[:4].shape), "FP32")
inp.set_data_from_numpy(x[:4])
result = client.infer(model, [inp], outputs=[tc.InferRequestedOutput("logits", class_count=3)])
out["classification"] = [[s.decode() for s in row] for row in result.as_numpy("logits")]
try:
    client.infer("no_such_model", [inp])
except InferenceServerException as exc:
    out["error"] = [exc.status(), exc.message()]
print(json.dumps(out))
"""

DUMP = r"""
import importlib, json, sys
module = importlib.import_module(sys.argv[1])
def fields(desc):
    out = {f.name: [f.number, f.type, f.is_repeated if hasattr(f, "is_repeated") else f.label]
           for f in desc.fields}
    for nested in desc.nested_types:
        out.update({f"{nested.name}.{k}": v for k, v in fields(nested).items()})
    for enum in desc.enum_types:
        out.update({f"{enum.name}.{v.name}": v.number for v in enum.values})
    return out
d = module.DESCRIPTOR
dump = {name: fields(m) for name, m in d.message_types_by_name.items()}
enums = d.enum_types_by_name.items()
dump.update({f"enum {name}": {v.name: v.number for v in e.values} for name, e in enums})
dump.update({f"service {name}": {m.name: [m.input_type.full_name, m.output_type.full_name,
                                          m.client_streaming, m.server_streaming] for m in s.methods}
             for name, s in d.services_by_name.items()})
print(json.dumps(dump))
"""


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_tritonclient_drives_our_server(
    server_process: Any, model_repository: Path, run_reference: Any, tmp_path: Path
) -> None:
    server = server_process("--model-repository", str(model_repository), "--no-strict-readiness")
    x = np.random.default_rng(0).normal(size=(8, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, server.address, "rgb", str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    meta = seen["metadata"]
    assert meta["name"] == "rgb" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "3", "16", "16"]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}]
    assert "classification" in seen["server"]["extensions"]

    reference = run_reference(model_repository / "rgb" / "1" / "model.onnx", x)
    np.testing.assert_allclose(np.array(seen["batch1"]), reference[:1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(seen["batch8"]), reference, rtol=1e-5, atol=1e-6)

    probs = _softmax(reference[:4])
    for row, strings in zip(probs, seen["classification"], strict=True):
        order = np.argsort(-row)[:3]
        parsed = [s.split(":") for s in strings]
        assert [int(p[1]) for p in parsed] == order.tolist()
        assert [p[2] for p in parsed] == [f"class_{i}" for i in order]
        np.testing.assert_allclose([float(p[0]) for p in parsed], row[order], atol=1e-5)

    status, message = seen["error"]
    assert "NOT_FOUND" in status and "no model named 'no_such_model'" in message
    assert server.stop() == 0


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ("convserve.protos.inference.grpc_service_pb2", "tritonclient.grpc.service_pb2"),
        ("convserve.protos.inference.model_config_pb2", "tritonclient.grpc.model_config_pb2"),
    ],
)
def test_v2_field_numbers_equal_tritonclient(ours: str, theirs: str) -> None:
    """Our hand-written protos against tritonclient's generated ones: every message, field, enum value and
    RPC we declare exists there with the same number, type and label (we may declare less, never other)."""

    def dump(module: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-c", DUMP, module], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    mine, reference = dump(ours), dump(theirs)
    assert mine, f"nothing declared in {ours}"
    for message, fields in mine.items():
        assert message in reference, f"{message} is not a tritonclient message"
        for field, spec in fields.items():
            theirs_spec = reference[message].get(field)
            assert theirs_spec == spec, (message, field, spec, theirs_spec)
