"""Hostile configs at the repository's size limits (deep nesting, thousands of fields, a label file at its
limit) are refused with their reason, through model control and through polling, and health still answers
SERVING. How long health takes meanwhile is a benchmark's question: benchmarks/repository_stall.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convserve.protos.convserve.v1 import classifier_pb2 as cpb
from convserve.protos.convserve.v1 import classifier_pb2_grpc
from convserve.protos.inference import grpc_service_pb2 as pb
from convserve.protos.inference import grpc_service_pb2_grpc as pb_grpc
from convserve.testing.hostile_configs import write_hostile_models

TOKEN = "hostile-configs-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def _reasons(stub: Any) -> dict[str, str]:
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10, metadata=AUTH)
    return {m.name: m.reason for m in index.models if m.state == "UNAVAILABLE"}


def test_hostile_configs_are_refused_and_health_keeps_serving(
    server_factory: Any, tmp_path: Path, make_model: Any
) -> None:
    repo = tmp_path / "repo"
    make_model(repo / "good" / "1" / "model.onnx")
    srv = server_factory(
        model_repository=str(repo), allow_model_control=True, auth_tokens=(TOKEN,),
        repository_poll_seconds=0.1,
    )  # fmt: skip
    later = tmp_path / "later"  # moved in while the server runs, for polling to find
    phrases = write_hostile_models(repo)
    polled = write_hostile_models(later, "_polled")
    with grpc.insecure_channel(srv.address) as channel:
        control = classifier_pb2_grpc.ClassifierStub(channel)
        v2 = pb_grpc.GRPCInferenceServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        for name in phrases:  # model control: each refused by its reason, none an error of the server
            control.LoadModel(cpb.LoadModelRequest(model=name), timeout=30, metadata=AUTH)
            assert phrases[name] in _reasons(v2).get(name, ""), (name, _reasons(v2).get(name))
        for name in polled:  # polling: the same folders under new names
            (later / name).rename(repo / name)
        deadline = time.monotonic() + 30
        while not set(polled) <= set(_reasons(v2)) and time.monotonic() < deadline:
            time.sleep(0.05)
        reasons = _reasons(v2)
        for name, phrase in polled.items():
            assert phrase in reasons.get(name, ""), (name, reasons.get(name))
        check = health.Check(health_pb2.HealthCheckRequest(), timeout=10, metadata=AUTH)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        assert v2.ModelReady(pb.ModelReadyRequest(name="good"), timeout=10, metadata=AUTH).ready
