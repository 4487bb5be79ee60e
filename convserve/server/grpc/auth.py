"""Token auth on the gRPC port: a real interceptor, because it must also guard reflection; installed only
when a token file is configured. Health checks stay open (probes carry no token)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from ..tokens import bearer_valid

HEALTH_SERVICE = "grpc.health.v1.Health"


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` on every call except health checks (probes have no token)."""

    def __init__(self, tokens: Sequence[bytes], exempt: Sequence[str] = (HEALTH_SERVICE,)) -> None:
        self._tokens = tuple(tokens)
        self._exempt = tuple(f"/{s}/" for s in exempt)

    def _authorized(self, metadata: Sequence[tuple[str, Any]] | None) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                return bearer_valid(value, self._tokens)
        return False

    async def intercept_service(
        self, continuation: Callable[..., Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        if details.method.startswith(self._exempt) or self._authorized(details.invocation_metadata):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        return _refusal(
            handler, "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'"
        )


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler answering UNAUTHENTICATED from the metadata alone, without reading the request body.

    It is registered as request-streaming whatever the method is: gRPC then starts it before any message
    arrives, and it returns without iterating, so an unauthenticated max-size message is never buffered
    whole or parsed (HTTP/2 flow control stops the sender). It sets the status rather than raising
    ``abort`` so that no traceback keeps the call's state alive.
    """

    async def deny(requests: Any, context: grpc.aio.ServicerContext) -> None:
        context.set_code(grpc.StatusCode.UNAUTHENTICATED)
        context.set_details(message)

    async def deny_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        context.set_code(grpc.StatusCode.UNAUTHENTICATED)
        context.set_details(message)
        return
        yield  # pragma: no cover - makes this an async generator

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kw)
    return grpc.stream_unary_rpc_method_handler(deny, **kw)
