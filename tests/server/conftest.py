"""Server-area fixtures: a channel to the shared test server and the two API stubs over it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest


@pytest.fixture(scope="session")
def channel(server: Any) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="session")
def classifier(channel: grpc.Channel) -> Any:
    from convserve.protos.convserve.v1 import classifier_pb2_grpc

    return classifier_pb2_grpc.ClassifierStub(channel)


@pytest.fixture(scope="session")
def v2(channel: grpc.Channel) -> Any:
    from convserve.protos.inference import grpc_service_pb2_grpc

    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
