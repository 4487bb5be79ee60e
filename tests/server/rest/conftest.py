"""REST-area fixtures: the shared server's REST base URL; helpers in rest_client.py beside this file."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# The helpers module beside this file, importable from the test modules (tests/ is not a package).
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def rest(server: Any) -> str:
    """``http://127.0.0.1:PORT`` of the shared test server's v2 REST front end."""
    return server.http_url


@pytest.fixture(scope="session")
def v2(server: Any) -> Iterator[Any]:
    """A v2 gRPC stub to the same server, to compare REST answers with gRPC ones."""
    import grpc

    from convserve.protos.inference import grpc_service_pb2_grpc

    channel = grpc.insecure_channel(server.address)
    yield grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()
