"""One HTTP/1.1 connection: pipelined requests answered in order, parser errors answered as v2 errors.

aiohttp feeds its parser one socket read at a time, and when the parser fails on a malformed request,
every request parsed from that read is dropped and only the 400 is answered. A client pipelining two
good requests and a bad one then pairs the 400 with its first request. ``PipelinedHandler`` feeds the
parser each read in pieces cut after every ``\\r\\n\\r\\n`` (the end of a header block), so a malformed
request loses only itself: the requests before it are answered, then its 400, then the connection
closes, as nginx does. It also answers aiohttp's own 400s (bad request line or headers, which never
reach the middleware) with the v2 body ``{"error": "..."}``, decided and logged by the same edge code.

This relies on aiohttp's ``RequestHandler`` internals (``_messages``, ``_request_count``,
``_payload_parser``, ``_upgraded``) and the runner's ``_make_server`` hook; pyproject pins the aiohttp
minor versions this was checked against, and tests/server/rest/test_rest_pipelining.py catches a change.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from aiohttp.http import RawRequestMessage
from aiohttp.web_protocol import RequestHandler

from ..calls import CallInfo, Calls, error_status
from ..errors import InvalidInputError, failure
from ..observability.request_ids import REQUEST_ID_KEY, new_request_id
from .edge import json_error

__all__ = ["PipelinedRunner"]

_HEADERS_END = b"\r\n\r\n"
# Cuts per socket read that complete no request (a body full of "\r\n\r\n") before the rest of the read
# is fed whole: each cut costs one parser call, so a hostile body costs at most this many extra calls per
# read; cuts that complete a request are not counted (the request itself costs far more than the call).
_BLIND_CUTS = 8


class PipelinedHandler(RequestHandler):
    """aiohttp's connection handler, feeding the parser one header block at a time."""

    __slots__ = ("_edge", "_refused")

    def __init__(self, manager: PipelinedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._edge = manager.edge
        self._refused = False  # a malformed request was queued: nothing after it is read

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._payload_parser is not None or self._upgraded:
            super().data_received(data)
            return
        start, blind = 0, _BLIND_CUTS
        while True:
            end = data.find(_HEADERS_END, start) if blind else -1
            if end < 0 or end + len(_HEADERS_END) == len(data):
                self._feed(data[start:] if start else data)
                return
            end += len(_HEADERS_END)
            if not self._feed(data[start:end]):
                blind -= 1
            if self._refused or self._payload_parser is not None or self._upgraded:
                # The rest is either after a refused request (never answered) or for the upgraded protocol.
                if not self._refused:
                    super().data_received(data[end:])
                return
            start = end

    def _feed(self, piece: bytes) -> bool:
        """Parse ``piece``; True when it completed at least one request's headers."""
        before = self._request_count
        super().data_received(piece)
        if self._request_count == before:
            return False
        if self._messages and not isinstance(self._messages[-1][0], RawRequestMessage):
            self._refused = True  # aiohttp queued its parser-error stand-in
        return True

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request aiohttp could not parse (400) or a failure that escaped the middleware (500):
        answered ``{"error": ...}`` as decided by ``errors.failure``, logged once, then the connection
        closes (its framing can no longer be trusted)."""
        if request.writer.output_size > 0:
            raise ConnectionError("the reply was already started; no error reply can follow it")
        start = time.perf_counter()
        if status == 400:
            detail = message or (str(exc) if exc is not None else "unparseable request")
            exc = InvalidInputError(f"malformed HTTP request: {detail}")
        elif exc is None:
            exc = RuntimeError(message or f"HTTP {status}")
        peer = _peer(self.transport)
        call = CallInfo(new_request_id(), "HTTP", peer=peer)
        f = failure(exc, call.request_id)
        error_status(exc, call, 0.0, peer)
        self._edge.access(call, f.code.name, start)
        response = json_error(f.http_status, f.message)
        response.headers[REQUEST_ID_KEY] = call.request_id
        response.force_close()
        return response


class PipelinedServer(web.Server):
    """aiohttp's low-level server, building ``PipelinedHandler`` connections."""

    def __init__(self, base: web.Server, edge: Calls) -> None:
        super().__init__(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            **base._kwargs,
        )
        self.edge = edge

    def __call__(self) -> RequestHandler:
        return PipelinedHandler(self, loop=self._loop, **self._kwargs)


class PipelinedRunner(web.AppRunner):
    """``web.AppRunner`` serving its application through ``PipelinedServer``."""

    def __init__(self, app: web.Application, edge: Calls, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._edge = edge

    async def _make_server(self) -> web.Server:
        return PipelinedServer(await super()._make_server(), self._edge)


def _peer(transport: Any) -> str:
    name = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(name, tuple) and len(name) >= 2:
        return f"{name[0]}:{name[1]}"
    return ""
