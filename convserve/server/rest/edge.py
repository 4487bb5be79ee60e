"""The edge of every REST request: request id, bearer auth, drain refusal, the one error translation, logs.

It does for HTTP what ``server/grpc/edge.py`` does for gRPC, with the same parts: the request id comes
from ``x-request-id`` (or is generated) and goes back as a header; a failure is decided once by
``errors.failure`` and answered with its HTTP status and the v2 body ``{"error": "..."}``; the same
failed-request and access log lines are written; and the call is counted in the in-flight
total every front end shares (``server/calls.py``), so a drain waits for REST calls too.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from ..calls import CallInfo, Calls, bind_call, error_status, unbind_call
from ..errors import RequestTooLargeError, UnauthenticatedError, failure
from ..observability.request_ids import REQUEST_ID_KEY, request_id_from_metadata
from ..tokens import bearer_valid

__all__ = ["PROBES", "PUBLIC", "RestEdge", "json_error", "json_response"]

# Route names answered while draining (probes watch a replica go away) ...
PROBES = frozenset(("live", "ready", "model_ready", "model_version_ready"))
# ... and those answered without a token: Kubernetes httpGet probes carry none.
PUBLIC = frozenset(("live", "ready"))

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(obj: object, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(obj, separators=(",", ":")).encode(), status=status, content_type="application/json"
    )


def json_error(status: int, message: str) -> web.Response:
    """The v2 error reply: ``{"error": message}``."""
    return json_response({"error": message}, status)


class RestEdge:
    """aiohttp middleware wrapping every route (unmatched paths included)."""

    def __init__(self, edge: Calls, tokens: Sequence[bytes]) -> None:
        self.edge = edge
        self.tokens = tuple(tokens)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        route = request.match_info.route
        name = route.name or ""
        method = f"{request.method} {route.resource.canonical if route.resource else request.path}"
        given = request.headers.get(REQUEST_ID_KEY)
        rid = request_id_from_metadata(((REQUEST_ID_KEY, given),) if given else ())
        call = CallInfo(rid, method, peer=_peer(request))
        token = bind_call(call)
        self.edge.begin()
        code = "OK"
        try:
            try:
                if self.tokens and name not in PUBLIC:
                    self._authenticate(request)
                if name not in PROBES:
                    self.edge.refuse_if_draining()
                response = await handler(request)
            except web.HTTPRequestEntityTooLarge as exc:  # aiohttp's own bound, for chunked bodies
                raise RequestTooLargeError(
                    f"request body: over the largest message this server accepts ({exc.text or exc.reason})"
                ) from None
            except web.HTTPException as exc:  # aiohttp's router: unknown path, wrong method
                code = f"HTTP_{exc.status}"
                response = json_error(exc.status, _router_message(request, exc))
        except asyncio.CancelledError:  # the client went away; the core stopped its work
            code = "CANCELLED"
            raise
        except Exception as exc:
            f = failure(exc, call.request_id)
            code = f.code.name
            error_status(exc, call, time.perf_counter() - start, call.peer)
            response = json_error(f.http_status, f.message)
            if isinstance(exc, UnauthenticatedError):
                response.headers["WWW-Authenticate"] = 'Bearer realm="convserve"'
        finally:
            unbind_call(token)
            self.edge.end()
            self.edge.access(call, code, start)
        response.headers[REQUEST_ID_KEY] = call.request_id
        if self.edge.health.draining:
            # The connection ends after this reply: the client's next request opens a new one, which the
            # closed listener refuses cleanly, instead of riding a connection the drain is about to close.
            response.force_close()
        return response

    def _authenticate(self, request: web.Request) -> None:
        if not bearer_valid(request.headers.get("Authorization"), self.tokens):
            raise UnauthenticatedError(
                "missing or invalid bearer token: send header 'Authorization: Bearer <token>'"
            )


def _peer(request: web.Request) -> str:
    """The client's connection, address and port ("127.0.0.1:50123"): logs and fair admission key it."""
    transport = request.transport
    name = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(name, tuple) and len(name) >= 2:
        return f"{name[0]}:{name[1]}"
    return request.remote or ""


def _router_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no such endpoint: {request.method} {request.path}; the v2 REST API lives under /v2"
    if exc.status == 405:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
        return f"method {request.method} is not allowed on {request.path}; allowed: {allowed}"
    return exc.text or exc.reason
