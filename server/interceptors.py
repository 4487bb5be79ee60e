"""The edge of every RPC: request id, refusal while draining, error → status translation, logs; token auth.

Our servicers' methods are wrapped once, at registration (``Edge.wrap``), rather than through a
per-call ``grpc.aio.ServerInterceptor``: the wrapper costs one coroutine frame per call, which matters
at tens of thousands of small requests per second. Token auth is a real interceptor because it must
also guard reflection; it is installed only when a token file is configured.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from .errors import DrainingError, InvalidInputError, failure, status_for
from .health import Health
from .logging_setup import (
    REQUEST_ID_KEY,
    access_log_enabled,
    log_access,
    log_failed_request,
    request_id_from_metadata,
)

log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"


@dataclass(slots=True)
class CallInfo:
    """What the edge knows about the current call; services fill in model, version and image count."""

    request_id: str
    method: str
    model: str = ""
    version: str = ""
    images: int | None = None
    peer: str = ""  # the client's connection ("ipv4:127.0.0.1:50123"): logs, fair admission between clients


_current: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar("convserve_call", default=None)


class MalformedRequest:
    """Stands in for request bytes that do not parse as the method's message type."""

    __slots__ = ("error", "type_name")

    def __init__(self, type_name: str, error: str) -> None:
        self.type_name = type_name
        self.error = error


def _tolerant_parser(cls: Any, on_message: Callable[[int], None] | None = None) -> Callable[[bytes], Any]:
    parse = cls.FromString
    name = cls.DESCRIPTOR.full_name

    def parse_request(data: bytes) -> Any:
        if on_message is not None:
            on_message(len(data))
        try:
            return parse(data)
        except DecodeError as exc:
            return MalformedRequest(name, str(exc) or "wire format was corrupt")

    return parse_request


def require_message(request: Any) -> None:
    """Raise InvalidInputError when the request bytes did not parse (streams call this per message)."""
    if type(request) is MalformedRequest:
        raise InvalidInputError(
            f"request: expected a serialized {request.type_name} message, "
            f"got bytes that do not parse ({request.error})"
        )


def bind_call(call: CallInfo) -> contextvars.Token[CallInfo | None]:
    """Make ``call`` the current call of this task (the REST edge does what the gRPC wrapper does)."""
    return _current.set(call)


def unbind_call(token: contextvars.Token[CallInfo | None]) -> None:
    _current.reset(token)


def current_call() -> CallInfo:
    """The CallInfo of the RPC running in this task (a fresh anonymous one outside an RPC)."""
    call = _current.get()
    return call if call is not None else CallInfo(request_id="", method="")


def error_status(
    exc: BaseException, call: CallInfo, duration_s: float | None = None, peer: str = ""
) -> tuple[grpc.StatusCode, str]:
    """Translate an exception to (status, client message) with ``errors.failure`` and log it once.

    Domain errors keep their message and log one line without a traceback; anything else becomes
    INTERNAL "internal error, request id …" and its traceback goes to the log only.
    """
    f = failure(exc, call.request_id)
    log_failed_request(
        request_id=call.request_id,
        method=call.method,
        code=f.code.name,
        message=str(exc) if f.internal else f.message,
        model=call.model,
        version=call.version,
        reason=f.reason,
        duration_s=duration_s,
        peer=peer,
        exc_info=exc if f.internal else None,
    )
    _release_frames(exc)
    return f.code, f.message


def _release_frames(exc: BaseException) -> None:
    """Drop the tracebacks of ``exc`` and its causes once it is translated and logged.

    A traceback holds every frame it passed through, and with them the request (up to max_message_bytes)
    and its decoded copies. Raising the status from inside the handler's ``except`` puts those frames in a
    reference cycle that only the cyclic GC frees, which an idle server may not run for minutes: 60 refused
    63 MiB messages stayed resident (1.1-3.4 GB) without this.
    """
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__traceback__ = None
        link = link.__cause__ or link.__context__


class Edge:
    """Wraps servicer methods; counts in-flight calls so shutdown can wait for them."""

    def __init__(self, health: Health, on_message: Callable[[int], None] | None = None) -> None:
        self.health = health
        self.on_message = on_message  # sees each request message's size (heap trimming after large ones)
        self.in_flight = 0
        self._idle: asyncio.Event | None = None

    def register(
        self, server: grpc.aio.Server, servicer: Any, service: ServiceDescriptor, probes: Sequence[str] = ()
    ) -> None:
        """Add ``servicer`` to ``server``, each RPC method (read from the service descriptor) edge-wrapped.

        Requests are parsed by a deserializer that never raises: bytes that are not a valid message
        become a ``MalformedRequest``, which the edge answers with INVALID_ARGUMENT (grpc itself would
        answer UNKNOWN). ``probes`` name methods still answered while draining (liveness/readiness).
        """
        handlers = {}
        for method in service.methods:
            fn = getattr(servicer, method.name)
            full = f"/{service.full_name}/{method.name}"
            refuse = method.name not in probes
            kw = {
                "request_deserializer": _tolerant_parser(GetMessageClass(method.input_type), self.on_message),
                "response_serializer": GetMessageClass(method.output_type).SerializeToString,
            }
            if method.client_streaming and method.server_streaming:
                handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                    self._streaming(fn, full, refuse), **kw
                )
            elif not method.client_streaming and not method.server_streaming:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    self._unary(fn, full, refuse), **kw
                )
            else:
                raise ValueError(f"{full}: only unary and bidirectional methods are served")
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
        server.add_registered_method_handlers(service.full_name, handlers)

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no wrapped call is running (True) or ``timeout`` seconds pass (False)."""
        if self.in_flight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def _enter(self, context: grpc.aio.ServicerContext, method: str) -> CallInfo:
        # The peer is read once per call (a string grpc builds on each peer() call) and reused.
        rid = request_id_from_metadata(context.invocation_metadata())
        call = CallInfo(rid, method, peer=context.peer())
        context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))
        self.in_flight += 1
        return call

    def refuse_if_draining(self) -> None:
        """Raise DrainingError once shutdown began (every front end refuses new work the same way)."""
        if self.health.draining:
            raise DrainingError(
                "server is shutting down and accepts no new requests; "
                "retry on another replica or after restart"
            )

    def begin(self) -> None:
        """A call from another front end (REST) started: drain waits for it too."""
        self.in_flight += 1

    def end(self) -> None:
        """A call counted by ``begin`` (or the gRPC wrapper) finished."""
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def _fail(
        self, context: grpc.aio.ServicerContext, exc: BaseException, call: CallInfo, start: float
    ) -> None:
        code, message = error_status(exc, call, time.perf_counter() - start, call.peer)
        # Set the status and return instead of context.abort(): abort raises from inside the handler's
        # except block, and that exception's traceback kept the handler's frame (and the request in it)
        # in a reference cycle until the cyclic GC ran (see _release_frames).
        context.set_code(code)
        context.set_details(message)
        context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))

    def access(self, call: CallInfo, code: str, start: float) -> None:
        """The access-log line of a finished call (every front end), when the access log is on."""
        if access_log_enabled():
            log_access(
                request_id=call.request_id,
                method=call.method,
                code=code,
                duration_s=time.perf_counter() - start,
                model=call.model,
                version=call.version,
                images=call.images,
                peer=call.peer,
            )

    def _unary(
        self, fn: Callable[..., Awaitable[Any]], method: str, refuse: bool
    ) -> Callable[..., Awaitable[Any]]:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = "OK"
            call = self._enter(context, method)
            token = _current.set(call)
            try:
                if refuse:
                    self.refuse_if_draining()
                require_message(request)
                return await fn(request, context)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as exc:
                code = status_for(exc).name
                await self._fail(context, exc, call, start)
            finally:
                _current.reset(token)
                self.end()
                self.access(call, code, start)

        unary.__name__ = fn.__name__
        return unary

    def _streaming(
        self, fn: Callable[..., AsyncIterator[Any]], method: str, refuse: bool
    ) -> Callable[..., Awaitable[None]]:
        # A coroutine that writes, not an async generator that yields: when the client cancels, grpc cancels
        # this task wherever it waits (a write included) and the ``finally`` runs here, in this task's
        # context. A generator suspended at ``yield`` is instead closed later by the garbage collector, in
        # another context, and its call stayed counted in flight until then (a drain waited out its grace).
        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> None:
            start = time.perf_counter()
            code = "OK"
            call = self._enter(context, method)
            token = _current.set(call)
            responses: AsyncIterator[Any] | None = None
            try:
                if refuse:
                    self.refuse_if_draining()
                responses = fn(request, context)
                async for response in responses:
                    await context.write(response)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as exc:
                code = status_for(exc).name
                await self._fail(context, exc, call, start)
            finally:
                self.end()
                _current.reset(token)
                self.access(call, code, start)
                if responses is not None:
                    await responses.aclose()  # type: ignore[attr-defined]  # stops its reader and tasks now

        streaming.__name__ = fn.__name__
        return streaming


def read_tokens(path: str | Path) -> tuple[bytes, ...]:
    """Accepted bearer tokens: one per line; blank lines and ``#`` comments ignored."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    tokens = tuple(
        line.strip().encode() for line in lines if line.strip() and not line.lstrip().startswith("#")
    )
    if not tokens:
        raise ValueError(f"auth token file {path} holds no tokens")
    return tokens


def bearer_valid(value: str | bytes | None, tokens: Sequence[bytes]) -> bool:
    """Whether an ``authorization`` value is ``Bearer <one of tokens>`` (gRPC metadata or HTTP header)."""
    if value is None:
        return False
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    scheme, _, token = text.partition(" ")
    if scheme.lower() != "bearer":
        return False
    given = token.strip().encode("latin-1", "replace")
    # Compare against every token so the time taken does not reveal which prefix matched.
    ok = False
    for expected in tokens:
        ok |= hmac.compare_digest(given, expected)
    return ok


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
