"""Client exceptions and the one table mapping gRPC status codes back to them.

    ConvserveError                 any other status (INTERNAL, UNKNOWN, ...)
    ├── InvalidInputError          INVALID_ARGUMENT   bad image, tensor, top_k, empty batch; SDK's checks
    ├── ModelNotFoundError         NOT_FOUND          unknown model or version
    ├── ServerBusyError            RESOURCE_EXHAUSTED queue full, too many images, message too large
    ├── DeadlineExceededError      DEADLINE_EXCEEDED  the call's deadline passed
    ├── ServerUnavailableError     UNAVAILABLE        connection refused, model not ready, server draining
    ├── UnauthenticatedError       UNAUTHENTICATED    missing or wrong bearer token
    └── PermissionDeniedError      PERMISSION_DENIED  the server refuses the operation

Every exception carries ``.code`` (a ``grpc.StatusCode``) and ``.details`` (the server's message).
"""

from __future__ import annotations

import grpc


class ConvserveError(Exception):
    """Base of every error the SDK raises; ``str()`` is one line fit for a terminal."""

    # The `convserve` CLI prints user-facing errors as one `error: ...` line instead of a traceback.
    user_facing = True

    # The status an error raised by the SDK itself (before any call) reports.
    default_code = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.code: grpc.StatusCode = code or self.default_code
        self.details = details

    def __str__(self) -> str:
        return f"{self.details} [{self.code.name}]"

    def __reduce__(self) -> tuple[type, tuple[str, grpc.StatusCode]]:  # picklable across processes
        return (type(self), (self.details, self.code))


class InvalidInputError(ConvserveError):
    """The request was malformed: the server said INVALID_ARGUMENT, or the SDK caught it before sending."""

    user_facing = True
    default_code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFoundError(ConvserveError):
    """The server has no such model or version."""

    user_facing = True
    default_code = grpc.StatusCode.NOT_FOUND


class ServerBusyError(ConvserveError):
    """The server refused the work for now (RESOURCE_EXHAUSTED); retried by default."""

    user_facing = True
    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(ConvserveError):
    """The call's deadline passed before an answer arrived."""

    user_facing = True
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class ServerUnavailableError(ConvserveError):
    """The server could not be reached or cannot serve now (UNAVAILABLE); retried by default."""

    user_facing = True
    default_code = grpc.StatusCode.UNAVAILABLE


class UnauthenticatedError(ConvserveError):
    """The server wants a valid bearer token or client certificate."""

    user_facing = True
    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(ConvserveError):
    """The server understood the caller and refused the operation."""

    user_facing = True
    default_code = grpc.StatusCode.PERMISSION_DENIED


ERROR_BY_STATUS: dict[grpc.StatusCode, type[ConvserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ServerBusyError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: ServerUnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


def error_for(code: grpc.StatusCode, details: str) -> ConvserveError:
    """The exception for a gRPC status; an unmapped code becomes a plain ``ConvserveError``."""
    return ERROR_BY_STATUS.get(code, ConvserveError)(details, code)
