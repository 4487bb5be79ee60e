"""Triton statistics from the per-version recorder: REST, gRPC ModelStatistics and nv_inference_* metrics
report the same counts, and the counts are the requests that were sent (REST and gRPC alike)."""

from __future__ import annotations

import urllib.request
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from prometheus_client.parser import text_string_to_metric_families
from rest_client import get, post_json

from convserve.protos.inference import grpc_service_pb2 as pb
from convserve.protos.inference import grpc_service_pb2_grpc as pb_grpc


def _x(n: int) -> np.ndarray:
    return np.random.default_rng(n).normal(0, 1, (n, 1, 8, 8)).astype(np.float32)


def test_rest_grpc_and_metrics_agree_and_count_what_was_sent(server_factory: Any) -> None:
    handle = server_factory()
    rest = handle.http_url
    for n in (1, 2):
        inp = {"name": "input", "datatype": "FP32", "shape": [n, 1, 8, 8], "data": _x(n).ravel().tolist()}
        assert post_json(f"{rest}/v2/models/gray/infer", {"inputs": [inp]}).status == 200
    bad = {"name": "input", "datatype": "FP32", "shape": [1, 1, 2, 2], "data": [0.0] * 4}
    assert post_json(f"{rest}/v2/models/gray/infer", {"inputs": [bad]}).status == 400
    with grpc.insecure_channel(handle.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for n in (3, 4):
            x = _x(n)
            tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(x.shape))
            request = pb.ModelInferRequest(
                model_name="gray", inputs=[tensor], raw_input_contents=[x.tobytes()]
            )
            stub.ModelInfer(request, timeout=30)
        grpc_stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="gray", version="2"), timeout=10)

    rest_stats = get(f"{rest}/v2/models/gray/versions/2/stats").json()
    assert json_format.ParseDict(rest_stats, pb.ModelStatisticsResponse()) == grpc_stats

    (s,) = rest_stats["model_stats"]
    inference = s["inference_stats"]
    assert (s["name"], s["version"]) == ("gray", "2")
    assert inference["success"]["count"] == 4 and inference["fail"]["count"] == 1
    assert s["inference_count"] == 1 + 2 + 3 + 4
    batches = s["batch_stats"]
    assert sum(b["compute_infer"]["count"] for b in batches) == s["execution_count"]
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in batches) == s["inference_count"]
    assert inference["compute_infer"]["ns"] > 0 and s["last_inference"] > 0

    with urllib.request.urlopen(f"http://127.0.0.1:{handle.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    nv = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels == {"model": "gray", "version": "2"} and sample.name.startswith("nv_")
    }
    assert nv["nv_inference_request_success"] == inference["success"]["count"]
    assert nv["nv_inference_request_failure"] == inference["fail"]["count"]
    assert nv["nv_inference_count"] == s["inference_count"]
    assert nv["nv_inference_exec_count"] == s["execution_count"]
    assert nv["nv_inference_compute_infer_duration_us"] == inference["compute_infer"]["ns"] // 1000
    assert nv["nv_inference_request_duration_us"] == inference["success"]["ns"] // 1000

    one = get(f"{rest}/v2/models/gray/stats").json()["model_stats"]
    assert [(m["name"], m["version"]) for m in one] == [("gray", "1"), ("gray", "2")]
    missing = get(f"{rest}/v2/models/gray/versions/9/stats")
    assert missing.status == 404 and "no version 9" in missing.error
