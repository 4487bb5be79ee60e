"""The benchmark's baseline servers compute what they claim: a baseline that answered wrongly (or cheaply)
would make every "convserve vs plain" ratio in the README a lie."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc
from convserve.protos.inference import grpc_service_pb2 as v2pb
from convserve.protos.inference import grpc_service_pb2_grpc as v2grpc

from .conftest import reference_logits

REPO_ROOT = Path(__file__).resolve().parents[1]
LENET = REPO_ROOT / "model_repository" / "digits_lenet" / "1" / "model.onnx"


@pytest.fixture(params=["plain", "sync", "empty"])
def baseline(request: Any, tmp_path: Path) -> Iterator[tuple[str, str]]:
    port_file = tmp_path / "port.json"
    cmd = [sys.executable, "-m", "benchmarks.baseline_server", "--mode", request.param,
           "--port-file", str(port_file), "--model", str(LENET)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text()):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
            assert time.monotonic() < deadline, f"{request.param} baseline never wrote its port file"
            time.sleep(0.1)
        yield request.param, f"127.0.0.1:{json.loads(port_file.read_text())['grpc_port']}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_baselines_answer_both_apis_with_the_models_outputs(baseline: tuple[str, str]) -> None:
    mode, target = baseline
    x = np.random.default_rng(3).random((3, 1, 28, 28), dtype=np.float32)
    want = reference_logits(LENET, x)
    with grpc.insecure_channel(target) as channel:
        v2 = v2grpc.GRPCInferenceServiceStub(channel)
        request = v2pb.ModelInferRequest(model_name="digits_lenet", id="r1")
        request.inputs.add(name="input", datatype="FP32", shape=[3, 1, 28, 28])
        request.raw_input_contents.append(x.tobytes())
        reply = v2.ModelInfer(request, timeout=30)
        out = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(list(reply.outputs[0].shape))
        classify = classifier_pb2_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(
                model="digits_lenet",
                top_k=1,
                images=[pb.Image(tensor=pb.Tensor(shape=[3, 1, 28, 28], data=x.tobytes()))],
            ),
            timeout=30,
        )
    assert reply.id == "r1" and len(classify.results) == 3
    if mode == "empty":
        assert out.shape == (3, 10) and not out.any(), "the empty servicer's canned reply"
        return
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    top = [r.predictions[0].index for r in classify.results]
    assert top == want.argmax(axis=1).tolist()
