"""A Triton model repository served unchanged: a config.pbtxt model and a bare ``1/model.onnx``, driven by
unmodified tritonclient (model config, raw-tensor inference, classification with the label file).

tritonclient runs in a child process (its stubs collide with ours in one process); outputs are compared
with ONNX Runtime run in this process on the same files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from convserve.testing.prerequisites import require_module

require_module("tritonclient", "tritonclient[grpc] is not installed (pip install -e '.[dev]')")

PBTXT = """
name: "triton_rgb"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "input", data_type: TYPE_FP32, format: FORMAT_NCHW, dims: [ 3, 16, 16 ] } ]
output [ { name: "logits", data_type: TYPE_FP32, dims: [ 5 ], label_filename: "labels.txt" } ]
dynamic_batching { max_queue_delay_microseconds: 200 }
instance_group [ { count: 2, kind: KIND_CPU } ]
model_warmup [ { name: "zeros", batch_size: 1 } ]
"""
LABELS = ["apple", "pear", "plum", "fig", "kiwi"]
# Triton's no-batch-dimension form, its graph under another file name.
UNBATCHED = """
platform: "onnxruntime_onnx"
max_batch_size: 0
default_model_filename: "mnist.onnx"
input [ { name: "input", data_type: TYPE_FP32, dims: [ -1, 1, 8, 8 ] } ]
output [ { name: "logits", data_type: TYPE_FP32, dims: [ -1, 4 ] } ]
"""

DRIVER = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tc

url, spec = sys.argv[1], json.loads(sys.argv[2])
client = tc.InferenceServerClient(url)
out = {"index": client.get_model_repository_index(as_json=True)}
for model, (inp_name, out_name, path) in spec.items():
    x = np.load(path)
    out[model] = {"config": client.get_model_config(model, as_json=True)["config"],
                  "metadata": client.get_model_metadata(model, as_json=True)}
    inp = tc.InferInput(inp_name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp], outputs=[tc.InferRequestedOutput(out_name)])
    out[model]["raw"] = result.as_numpy(out_name).tolist()
    result = client.infer(model, [inp], outputs=[tc.InferRequestedOutput(out_name, class_count=2)])
    out[model]["top2"] = [[s.decode() for s in row] for row in result.as_numpy(out_name)]
print(json.dumps(out))
"""


def test_triton_repository_serves_unchanged(
    server_process: Any, make_model: Any, run_reference: Any, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    make_model(repo / "triton_rgb" / "1" / "model.onnx", channels=3, size=16, classes=5, seed=21)
    (repo / "triton_rgb" / "config.pbtxt").write_text(PBTXT)
    (repo / "triton_rgb" / "labels.txt").write_text("\n".join(LABELS) + "\n")
    make_model(
        repo / "bare" / "1" / "model.onnx",
        channels=1,
        size=8,
        classes=4,
        seed=22,
        input_name="pixels",
        output_name="scores",
    )
    make_model(repo / "unbatched" / "1" / "mnist.onnx", size=8, classes=4, seed=23)
    (repo / "unbatched" / "config.pbtxt").write_text(UNBATCHED)
    rng = np.random.default_rng(1)
    inputs = {
        "triton_rgb": rng.normal(size=(3, 3, 16, 16)),
        "bare": rng.normal(size=(2, 1, 8, 8)),
        "unbatched": rng.normal(size=(3, 1, 8, 8)),
    }
    spec = {}
    for model, x in inputs.items():
        np.save(tmp_path / f"{model}.npy", x.astype(np.float32))
        names = ("pixels", "scores") if model == "bare" else ("input", "logits")
        spec[model] = [*names, str(tmp_path / f"{model}.npy")]

    server = server_process("--model-repository", str(repo))
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, server.address, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr + server.log_text()
    seen = json.loads(done.stdout)

    assert {(m["name"], m["state"]) for m in seen["index"]["models"]} == {
        ("triton_rgb", "READY"),
        ("bare", "READY"),
        ("unbatched", "READY"),
    }
    cfg = seen["triton_rgb"]["config"]
    assert cfg["max_batch_size"] == 8 and cfg["dynamic_batching"]["max_queue_delay_microseconds"] == "200"
    assert cfg["instance_group"][0]["count"] == 2
    assert cfg["input"][0]["dims"] == ["3", "16", "16"] and cfg["output"][0]["dims"] == ["5"]
    bare = seen["bare"]["config"]
    assert (bare["input"][0]["name"], bare["output"][0]["name"]) == ("pixels", "scores")
    assert bare["input"][0]["dims"] == ["1", "8", "8"] and bare["output"][0]["dims"] == ["4"]
    assert "dynamic_batching" in bare  # completed configs batch, with the server's defaults
    unbatched = seen["unbatched"]["config"]
    assert unbatched.get("max_batch_size", 0) == 0 and "dynamic_batching" not in unbatched
    assert unbatched["default_model_filename"] == "mnist.onnx"
    assert unbatched["input"][0]["dims"] == ["-1", "1", "8", "8"]
    assert unbatched["output"][0]["dims"] == ["-1", "4"]
    assert seen["unbatched"]["metadata"]["inputs"][0]["shape"] == ["-1", "1", "8", "8"]

    for model, x in inputs.items():
        graph = repo / model / "1" / ("mnist.onnx" if model == "unbatched" else "model.onnx")
        reference = run_reference(graph, x.astype(np.float32))
        np.testing.assert_allclose(np.array(seen[model]["raw"]), reference, rtol=1e-5, atol=1e-6)
        labels = LABELS if model == "triton_rgb" else [str(i) for i in range(reference.shape[1])]
        for row, strings in zip(reference, seen[model]["top2"], strict=True):
            best = np.argsort(-row)[:2]
            assert [s.split(":", 2)[1:] for s in strings] == [[str(i), labels[i]] for i in best]
    assert "not read by convserve" in server.log_text() and "model_warmup" in server.log_text()
    assert server.stop() == 0
