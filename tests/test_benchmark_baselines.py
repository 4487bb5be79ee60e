"""The benchmark's baseline servers compute what they claim: a baseline that answered wrongly (or cheaply),
counted its successes wrongly, or ran ONNX Runtime worse than convserve does would make every "convserve
vs plain" ratio on the performance page a lie."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import baseline_server
from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc
from convserve.protos.inference import grpc_service_pb2 as v2pb
from convserve.protos.inference import grpc_service_pb2_grpc as v2grpc
from convserve.server.runtime.session import SessionOptions, inline_options, ort_options
from convserve.server.settings import Settings

from .conftest import reference_logits

REPO_ROOT = Path(__file__).resolve().parents[1]
LENET = REPO_ROOT / "model_repository" / "digits_lenet" / "1" / "model.onnx"


@contextlib.contextmanager
def start(mode: str, tmp_path: Path, *flags: str) -> Iterator[tuple[subprocess.Popen[bytes], dict]]:
    port_file = tmp_path / f"port-{mode}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "benchmarks.baseline_server", "--mode", mode,
           "--port-file", str(port_file), "--model", str(LENET), *flags]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text()):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
            assert time.monotonic() < deadline, f"{mode} baseline never wrote its port file"
            time.sleep(0.1)
        yield proc, json.loads(port_file.read_text())
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(params=["plain", "inline", "sync", "empty"])
def baseline(request: Any, tmp_path: Path) -> Iterator[tuple[str, str]]:
    with start(request.param, tmp_path) as (_, ports):
        yield request.param, f"127.0.0.1:{ports['grpc_port']}"


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


def successes(metrics_port: int) -> dict[str, int]:
    """Successful calls by serving process, from the baseline's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        families = text_string_to_metric_families(reply.read().decode())
    return {s.labels["process"]: int(s.value) for f in families for s in f.samples
            if s.name == "baseline_requests_total" and s.labels.get("code") == "OK"}  # fmt: skip


def infer(channel: grpc.Channel, x: np.ndarray) -> np.ndarray:
    request = v2pb.ModelInferRequest(model_name="digits_lenet")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    reply = v2grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    return np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(list(reply.outputs[0].shape))


def test_processes_share_the_port_and_their_success_counts_add_up(tmp_path: Path) -> None:
    """Two inline processes on one port (SO_REUSEPORT): new connections reach both, each answers with the
    model's outputs, and /metrics counts every success of both, failures not at all."""
    x = np.random.default_rng(5).random((1, 1, 28, 28), dtype=np.float32)
    want = reference_logits(LENET, x)
    with start("inline", tmp_path, "--processes", "2") as (_, ports):
        target = f"127.0.0.1:{ports['grpc_port']}"
        calls = 0
        for _ in range(40):  # a fresh connection each time; the kernel picks the process
            with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                np.testing.assert_allclose(infer(channel, x), want, rtol=1e-4, atol=1e-5)
            calls += 1
            if len([n for n in successes(ports["metrics_port"]).values() if n]) == 2:
                break
        with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError):
            infer(channel, np.zeros((1, 3, 5, 5), np.float32))  # the wrong shape: not a success
        counts = successes(ports["metrics_port"])
        assert sorted(counts) == ["0", "1"] and all(counts.values()), f"both processes serve: {counts}"
        assert sum(counts.values()) == calls


def test_baselines_run_onnx_runtime_with_convserves_options() -> None:
    """The executor baseline gets a served model's main-session options, the inline ones its one-thread
    inline session's: both with spinning off, as convserve runs them (server/runtime/session.py)."""
    main = SessionOptions.of(Settings())
    assert baseline_server.session_options("plain") == main
    assert baseline_server.session_options("inline") == inline_options(main)
    assert baseline_server.session_options("sync") == inline_options(main)
    session = baseline_server.load_session(LENET, "plain")
    opts = session.get_session_options()
    want = ort_options(main)
    assert opts.intra_op_num_threads == want.intra_op_num_threads
    assert opts.graph_optimization_level == want.graph_optimization_level
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        assert opts.get_session_config_entry(key) == "0", key
