"""Domain errors raised where a problem is found, and the one table mapping them to gRPC status codes.

    ConvserveServerError
    ├── InvalidInputError          INVALID_ARGUMENT  bad image, tensor, top_k, empty batch
    ├── ModelNotFoundError         NOT_FOUND         unknown model or version
    ├── ModelNotReadyError         UNAVAILABLE       model loading, failed or unloading
    ├── DrainingError              UNAVAILABLE       server shutting down
    ├── QueueFullError             RESOURCE_EXHAUSTED batcher queue bound reached
    ├── TooManyImagesError         RESOURCE_EXHAUSTED image count (or decoded pixels) over the limit
    ├── ReplyTooLargeError         RESOURCE_EXHAUSTED the reply would exceed the largest message sent
    ├── RequestTooLargeError       RESOURCE_EXHAUSTED an HTTP body over the largest message accepted (413)
    ├── DeadlineExpiredError       DEADLINE_EXCEEDED deadline passed while queued; never run
    ├── UnauthenticatedError       UNAUTHENTICATED   missing or wrong token
    ├── PermissionDeniedError      PERMISSION_DENIED model control disabled
    └── NotSupportedError          UNIMPLEMENTED     a protocol extension convserve does not serve

``failure(exc, request_id)`` decides (status, message, reason) once, transport-neutrally: the gRPC edge
sends ``Failure.code``, an HTTP edge ``Failure.http_status``; logs and metrics reuse the same ``reason``.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc


class ConvserveServerError(Exception):
    """Base of every error the server reports to a client with a specific status."""

    reason = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInputError(ConvserveServerError):
    reason = "invalid_input"


class ModelNotFoundError(ConvserveServerError):
    reason = "model_not_found"


class ModelNotReadyError(ConvserveServerError):
    reason = "model_not_ready"


class DrainingError(ConvserveServerError):
    reason = "draining"


class QueueFullError(ConvserveServerError):
    reason = "queue_full"


class TooManyImagesError(ConvserveServerError):
    reason = "too_many_images"


class ReplyTooLargeError(ConvserveServerError):
    reason = "reply_too_large"


class RequestTooLargeError(ConvserveServerError):
    reason = "request_too_large"


class DeadlineExpiredError(ConvserveServerError):
    reason = "deadline_exceeded"


class UnauthenticatedError(ConvserveServerError):
    reason = "unauthenticated"


class PermissionDeniedError(ConvserveServerError):
    reason = "permission_denied"


class NotSupportedError(ConvserveServerError):
    reason = "not_supported"


STATUS_BY_ERROR: dict[type[ConvserveServerError], grpc.StatusCode] = {
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    ModelNotReadyError: grpc.StatusCode.UNAVAILABLE,
    DrainingError: grpc.StatusCode.UNAVAILABLE,
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TooManyImagesError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ReplyTooLargeError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RequestTooLargeError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpiredError: grpc.StatusCode.DEADLINE_EXCEEDED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    NotSupportedError: grpc.StatusCode.UNIMPLEMENTED,
}


# A status message travels in the grpc-message trailer; request-derived text (a multi-megabyte tensor
# name or datatype) copied into it whole would overflow the client's 16 KiB metadata limit and turn an
# INVALID_ARGUMENT into RESOURCE_EXHAUSTED. 1 KiB names any problem; the rest is cut.
MAX_STATUS_MESSAGE_BYTES = 1024


def truncate(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes (never inside a character), ending with a note
    of the original size so that the cut is visible."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    note = f"... [cut; {len(data)} bytes in all]"
    keep = max(0, limit - len(note))
    return data[:keep].decode("utf-8", "ignore") + note[: limit - keep]


def status_message(text: str) -> str:
    """A client-facing status message, bounded to MAX_STATUS_MESSAGE_BYTES."""
    return truncate(text, MAX_STATUS_MESSAGE_BYTES)


def status_for(error: BaseException) -> grpc.StatusCode:
    """The gRPC status for an exception; anything unknown is INTERNAL."""
    for kind in type(error).__mro__:
        if kind in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[kind]
    return grpc.StatusCode.INTERNAL


# The same statuses for an HTTP front end (KServe v2 REST answers errors as {"error": message}).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INTERNAL: 500,
}
# Where HTTP has a more precise word than the status above (a body too big is 413, not 429).
HTTP_STATUS_BY_REASON: dict[str, int] = {RequestTooLargeError.reason: 413}


@dataclass(frozen=True, slots=True)
class Failure:
    """How one failed request is reported: status, client message and metric reason, decided once."""

    code: grpc.StatusCode
    message: str
    reason: str
    internal: bool  # True: an unexpected exception; its traceback belongs in the log

    @property
    def http_status(self) -> int:
        return HTTP_STATUS_BY_REASON.get(self.reason) or HTTP_STATUS.get(self.code, 500)


def failure(exc: BaseException, request_id: str = "") -> Failure:
    """The one translation of an exception for every transport: domain errors keep their message and
    reason; anything else is INTERNAL "internal error, request id …" (details stay in the server log)."""
    if isinstance(exc, ConvserveServerError):
        return Failure(status_for(exc), status_message(exc.message), exc.reason, False)
    return Failure(grpc.StatusCode.INTERNAL, f"internal error, request id {request_id}", "internal", True)
