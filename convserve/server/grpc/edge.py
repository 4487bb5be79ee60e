"""The gRPC edge of every RPC: request id, refusal while draining, error → status, logs.

Our servicers' methods are wrapped once, at registration (``Edge.register``), rather than through a
per-call ``grpc.aio.ServerInterceptor``: the wrapper costs one coroutine frame per call, which matters
at tens of thousands of small requests per second. What is not gRPC's own (the call record, in-flight
count, drain refusal, error translation, access log) is ``server/calls.py``, shared with REST.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from ..calls import CallInfo, Calls, _current, error_status
from ..errors import InvalidInputError, status_for
from ..observability.request_ids import REQUEST_ID_KEY, request_id_from_metadata


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


class Edge(Calls):
    """Wraps servicer methods; each call is counted in flight (``Calls``) so shutdown can wait for it."""

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

    def _enter(self, context: grpc.aio.ServicerContext, method: str) -> CallInfo:
        # The peer is read once per call (a string grpc builds on each peer() call) and reused.
        rid = request_id_from_metadata(context.invocation_metadata())
        call = CallInfo(rid, method, peer=context.peer())
        context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))
        self.in_flight += 1
        return call

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
