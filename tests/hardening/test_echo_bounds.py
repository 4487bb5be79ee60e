"""Request strings are never echoed unbounded: multi-megabyte names, datatypes and ids get INVALID_ARGUMENT
with a status message of at most 1 KiB (not RESOURCE_EXHAUSTED from an oversized trailer), ids come back
exactly or are refused by name, every log line stays under 8 KiB, and failure lines are rate-limited with
a count of what was held back. Against a real server subprocess, reading its real log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc
from convserve.protos.inference import grpc_service_pb2 as v2pb
from convserve.protos.inference import grpc_service_pb2_grpc

SC = grpc.StatusCode
HUGE = 4 * 1024 * 1024
STATUS_LIMIT = 1024
LINE_LIMIT = 8 * 1024
X = np.random.default_rng(0).normal(size=(1, 1, 8, 8)).astype(np.float32)
BIG = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def _v2(
    name: str = "input", datatype: str = "FP32", output: str = "", rid: str = ""
) -> v2pb.ModelInferRequest:
    inp = v2pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=[1, 1, 8, 8])
    request = v2pb.ModelInferRequest(
        model_name="gray", id=rid, inputs=[inp], raw_input_contents=[X.tobytes()]
    )
    if output:
        request.outputs.add(name=output)
    return request


def _classify(model: str = "gray", rid: str = "") -> pb.ClassifyRequest:
    image = pb.Image(tensor=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 8, 8], data=X.tobytes()))
    return pb.ClassifyRequest(model=model, images=[image], request_id=rid)


def _invalid(call: Any, request: Any) -> str:
    try:
        call(request, timeout=30)
    except grpc.RpcError as err:
        assert err.code() == SC.INVALID_ARGUMENT, (err.code(), (err.details() or "")[:200])
        details = err.details() or ""
        assert len(details.encode()) <= STATUS_LIMIT, len(details.encode())
        return details
    raise AssertionError("the request succeeded")


def test_huge_request_strings_are_cut_and_stay_invalid_argument(
    spawn_server: Any, hardening_repository: Path
) -> None:
    sp = spawn_server(hardening_repository, "--log-format", "json")
    with grpc.insecure_channel(sp.address, BIG) as ch:
        classifier = classifier_pb2_grpc.ClassifierStub(ch)
        v2 = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
        assert "inputs[0].name: expected 'input', got 'nnn" in _invalid(v2.ModelInfer, _v2(name="n" * HUGE))
        assert "datatype" in _invalid(v2.ModelInfer, _v2(datatype="D" * HUGE))
        assert "outputs[0].name" in _invalid(v2.ModelInfer, _v2(output="o" * HUGE))
        assert "expected a model name" in _invalid(classifier.Classify, _classify(model="m" * HUGE))
        # The same inside the streams: the per-message error is cut too.
        (reply,) = classifier.ClassifyStream(iter([_classify(model="m" * HUGE)]), timeout=30)
        assert reply.error_code == SC.INVALID_ARGUMENT.value[0]
        assert len(reply.error_message.encode()) <= STATUS_LIMIT
        (reply,) = v2.ModelStreamInfer(iter([_v2(name="n" * HUGE)]), timeout=30)
        assert "INVALID_ARGUMENT" in reply.error_message and len(reply.error_message.encode()) <= STATUS_LIMIT

        # Correlation ids come back exactly as sent; one past the documented bound is refused by name.
        assert "request_id: expected at most 1024 characters" in _invalid(
            classifier.Classify, _classify(rid="r" * 8_000_000)
        )
        assert classifier.Classify(_classify(rid="trace-7"), timeout=30).request_id == "trace-7"
        assert "id: expected at most 1024 characters" in _invalid(v2.ModelInfer, _v2(rid="i" * 8_000_000))
        assert v2.ModelInfer(_v2(rid="trace-8"), timeout=30).id == "trace-8"
        (reply,) = classifier.ClassifyStream(iter([_classify(rid="s" * 4_000_000)]), timeout=30)
        assert reply.error_code == SC.INVALID_ARGUMENT.value[0] and "request_id" in reply.error_message
        assert reply.request_id and len(reply.request_id) <= 128

        assert classifier.Classify(_classify(), timeout=30).model == "gray"
    assert sp.stop() == 0
    log = sp.log_text()
    assert len(log.encode()) < 200_000, len(log.encode())
    for line in log.splitlines():
        assert len(line.encode()) <= LINE_LIMIT, line[:200]


def test_failure_lines_are_rate_limited_and_counted(spawn_server: Any, hardening_repository: Path) -> None:
    sp = spawn_server(hardening_repository, "--log-format", "json")
    sent = 300
    with grpc.insecure_channel(sp.address) as ch:
        classifier = classifier_pb2_grpc.ClassifierStub(ch)
        for _ in range(sent):
            _invalid(classifier.Classify, _classify(model="no such name!"))
        assert classifier.Classify(_classify(), timeout=30).model == "gray"
    assert sp.stop() == 0
    records = [json.loads(line) for line in sp.log_text().splitlines() if line.startswith("{")]
    failures = [
        r for r in records if r.get("event") == "request_failed" and r.get("reason") == "invalid_input"
    ]
    suppressed = sum(r.get("suppressed", 0) for r in records if r.get("reason") == "invalid_input")
    assert len(failures) < 60, len(failures)  # a burst of 10, then 1 a second
    assert len(failures) + suppressed == sent, (len(failures), suppressed)
