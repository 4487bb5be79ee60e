"""The control plane (server/core/control.py): one answer for both front ends, and its rules on its own.

Over a real server, each of Triton's control answers read over REST parses into exactly the protobuf
message gRPC returns (json_format, not the server's own converter, reads the REST side). Without any
transport, the control plane's refusals are checked on a loaded repository.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from convserve.protos.inference import grpc_service_pb2 as pb
from convserve.protos.inference import grpc_service_pb2_grpc as pb_grpc
from convserve.protos.inference import model_config_pb2 as mc
from convserve.server.core.control import EXTENSIONS, ControlPlane
from convserve.server.errors import InvalidInputError, PermissionDeniedError
from convserve.server.health import Health
from convserve.server.observability.metrics import Metrics
from convserve.server.repository.model_repository import ModelRepository

from ...conftest import test_settings


def _rest_json(server: Any, path: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    method = "GET" if data is None else "POST"
    request = urllib.request.Request(server.http_url + path, data=data, method=method)
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.status == 200
        return json.loads(reply.read())


# name → (gRPC call, REST path and body, how the REST JSON maps onto the gRPC reply message)
CASES: dict[str, tuple[Callable[[Any], Any], str, dict[str, Any] | None, Callable[[Any], Any]]] = {
    "server metadata": (
        lambda stub: stub.ServerMetadata(pb.ServerMetadataRequest()),
        "/v2", None,
        lambda obj: json_format.ParseDict(obj, pb.ServerMetadataResponse()),
    ),
    "model metadata": (
        lambda stub: stub.ModelMetadata(pb.ModelMetadataRequest(name="gray")),
        "/v2/models/gray", None,
        lambda obj: json_format.ParseDict(obj, pb.ModelMetadataResponse()),
    ),
    "model config": (
        lambda stub: stub.ModelConfig(pb.ModelConfigRequest(name="rgb", version="1")),
        "/v2/models/rgb/versions/1/config", None,
        lambda obj: pb.ModelConfigResponse(config=json_format.ParseDict(obj, mc.ModelConfig())),
    ),
    "statistics": (
        lambda stub: stub.ModelStatistics(pb.ModelStatisticsRequest(name="gray")),
        "/v2/models/gray/stats", None,
        lambda obj: json_format.ParseDict(obj, pb.ModelStatisticsResponse()),
    ),
    "repository index": (
        lambda stub: stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)),
        "/v2/repository/index", {"ready": True},
        lambda obj: json_format.ParseDict({"models": obj}, pb.RepositoryIndexResponse()),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rest_and_grpc_give_the_same_control_answer(server: Any, case: str) -> None:
    grpc_call, path, body, from_rest = CASES[case]
    with grpc.insecure_channel(server.address) as channel:
        over_grpc = grpc_call(pb_grpc.GRPCInferenceServiceStub(channel))
    over_rest = from_rest(_rest_json(server, path, body))
    if case == "server metadata":  # REST serves one more extension than gRPC: binary tensors
        assert list(over_rest.extensions) == [*over_grpc.extensions, "binary_tensor_data"]
        over_rest.ClearField("extensions")
        over_grpc.ClearField("extensions")
    assert over_rest == over_grpc


def _with_control(model_repository: Path, body: Callable[[ControlPlane], Any], **overrides: Any) -> Any:
    """Load the repository and run ``body(control)`` on a fresh loop: no transport at all."""

    async def main() -> Any:
        settings = test_settings(model_repository, **overrides)
        repository = ModelRepository(model_repository, settings, Metrics(enabled=False))
        repository.scan()
        await repository.load_all()
        health = Health(())
        await health.start()
        await health.set_serving()
        try:
            return await body(ControlPlane(repository, settings, health))
        finally:
            await repository.stop(1.0)

    return asyncio.run(asyncio.wait_for(main(), 120))


def test_the_control_plane_decides_without_a_transport(model_repository: Path) -> None:
    async def body(control: ControlPlane) -> None:
        assert control.ready and control.server_not_ready_reason() is None
        assert control.not_ready_reason("gray", "") is None
        assert "nope" in (control.not_ready_reason("nope", "") or "")  # unknown: not ready, not an error
        assert "version 9" in (control.not_ready_reason("gray", "9") or "")
        with pytest.raises(InvalidInputError, match="version"):
            control.not_ready_reason("gray", "one")
        assert list(control.server_metadata(("extra",)).extensions) == [*EXTENSIONS, "extra"]
        assert {m.name for m in control.model_statistics("gray", "").model_stats} == {"gray"}
        with pytest.raises(InvalidInputError, match="a version needs a model name"):
            control.model_statistics("", "1")
        with pytest.raises(InvalidInputError, match="single model repository"):
            control.repository_index("elsewhere", ready_only=False)
        with pytest.raises(PermissionDeniedError, match="--allow-model-control"):
            await control.load("gray")
        with pytest.raises(PermissionDeniedError, match="--allow-model-control"):
            await control.unload("gray")

    _with_control(model_repository, body)


def test_draining_makes_every_model_not_ready(model_repository: Path) -> None:
    async def body(control: ControlPlane) -> None:
        await control.health.drain()
        assert control.server_not_ready_reason() == "server is not ready: shutting down"
        assert control.not_ready_reason("gray", "") == "the server is shutting down"

    _with_control(model_repository, body)


def test_load_and_unload_with_model_control_refuse_parameters_by_name(model_repository: Path) -> None:
    async def body(control: ControlPlane) -> None:
        with pytest.raises(InvalidInputError, match=r"takes no parameters; got \['config'\]"):
            await control.load("gray", parameters=["config"])
        await control.unload("gray", parameters=["unload_dependents"])
        assert control.not_ready_reason("gray", "") is not None
        await control.load("gray")
        assert control.not_ready_reason("gray", "") is None

    _with_control(model_repository, body, allow_model_control=True, auth_tokens=("t",))
