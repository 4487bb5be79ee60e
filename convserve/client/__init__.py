"""convserve's Python SDK: ``Client`` and ``AsyncClient`` for the convserve.v1 gRPC API.

    from convserve.client import Client

    with Client("127.0.0.1:8001") as client:
        print(client.classify("digit.png"))

The base install (grpcio, protobuf, numpy, grpcio-health-checking) is enough; Pillow is needed only
to pass PIL images, which the caller already has.
"""

from ._async import AsyncClient
from ._core import RetryPolicy
from ._sync import Client
from .errors import (
    ConvserveError,
    DeadlineExceededError,
    InvalidInputError,
    ModelNotFoundError,
    PermissionDeniedError,
    ServerBusyError,
    ServerUnavailableError,
    UnauthenticatedError,
)
from .inputs import ImageInput
from .results import (
    BatchingSpec,
    Classification,
    InputSpec,
    ModelInfo,
    ModelMetadata,
    Prediction,
    VersionStatus,
)

__all__ = [
    "AsyncClient",
    "BatchingSpec",
    "Classification",
    "Client",
    "ConvserveError",
    "DeadlineExceededError",
    "ImageInput",
    "InputSpec",
    "InvalidInputError",
    "ModelInfo",
    "ModelMetadata",
    "ModelNotFoundError",
    "PermissionDeniedError",
    "Prediction",
    "RetryPolicy",
    "ServerBusyError",
    "ServerUnavailableError",
    "UnauthenticatedError",
    "VersionStatus",
]
