"""The v2 REST endpoints: HTTP ↔ the same calls the gRPC front end makes, nothing decided here.

Inference converts the body (``codec``) and calls the one inference core. Health, metadata, model
configuration, statistics and the repository are the control plane's (``server/core/control.py``), whose
answers are the protocol's messages: each route passes the path's and body's fields and prints the
answer as Triton's JSON (``messages``), so the REST and gRPC answers cannot drift apart.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from ..calls import current_call
from ..core.control import ControlPlane, not_served
from ..core.inference import InferenceCore, InferenceRequest
from ..errors import InvalidInputError, RequestTooLargeError
from ..observability.request_ids import echo_request_id
from ..repository.model_repository import parse_version
from . import json_body
from .codec import HEADER_LENGTH, binary_output_names, encode_reply, inputs_of, outputs_of, parse_body
from .edge import json_error, json_response
from .messages import message_json

__all__ = ["API", "EXTENSIONS_EXTRA", "INLINE_PARSE_BYTES", "Routes"]

API = "rest"  # the metrics label of REST inference requests
# Triton's extension names served over REST: the gRPC service's, plus the binary tensor extension.
EXTENSIONS_EXTRA = ("binary_tensor_data",)
# Bodies up to this size are parsed on the event loop (~1 ms); bigger ones on the core's CPU pool.
INLINE_PARSE_BYTES = 256 * 1024


def _version(request: web.Request) -> str:
    return request.match_info.get("version", "")


class Routes:
    """Every REST endpoint, over the control plane and the inference core."""

    def __init__(self, control: ControlPlane, core: InferenceCore, max_body: int) -> None:
        self.control = control
        self.core = core
        self.max_body = max_body
        self._big_parse = asyncio.Lock()

    def add_to(self, app: web.Application) -> None:
        """Register the routes; /v2/models/stats comes before /v2/models/{model} so it is not a name."""
        get, post = web.get, web.post
        m, mv = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
        app.add_routes(
            [
                get("/v2/health/live", self.live, name="live"),
                get("/v2/health/ready", self.ready, name="ready"),
                get("/v2", self.server_metadata, name="server_metadata"),
                get("/v2/models/stats", self.statistics, name="all_stats"),
                get(f"{m}/ready", self.model_ready, name="model_ready"),
                get(f"{mv}/ready", self.model_ready, name="model_version_ready"),
                get(m, self.model_metadata, name="model_metadata"),
                get(mv, self.model_metadata, name="model_version_metadata"),
                get(f"{m}/config", self.model_config, name="model_config"),
                get(f"{mv}/config", self.model_config, name="model_version_config"),
                get(f"{m}/stats", self.statistics, name="model_stats"),
                get(f"{mv}/stats", self.statistics, name="model_version_stats"),
                post(f"{m}/infer", self.infer, name="infer"),
                post(f"{mv}/infer", self.infer, name="version_infer"),
                post("/v2/repository/index", self.repository_index, name="repository_index"),
                post("/v2/repository/models/{model}/load", self.load, name="load"),
                post("/v2/repository/models/{model}/unload", self.unload, name="unload"),
                # Triton's extensions convserve does not serve: 501 naming the extension, as over gRPC.
                web.route("*", "/v2/systemsharedmemory{tail:.*}", self._unserved("SystemSharedMemoryStatus")),
                web.route("*", "/v2/cudasharedmemory{tail:.*}", self._unserved("CudaSharedMemoryStatus")),
                web.route("*", "/v2/trace/setting", self._unserved("TraceSetting")),
                web.route("*", f"{m}/trace/setting", self._unserved("TraceSetting")),
                web.route("*", "/v2/logging", self._unserved("LogSettings")),
            ]
        )

    def _unserved(self, rpc: str) -> Any:
        """A handler refusing as the gRPC service's ``rpc`` does: 501 naming the extension."""

        async def unserved(request: web.Request) -> web.Response:
            raise not_served(rpc)

        return unserved

    # ---- health and metadata ------------------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        return json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        """200 ``{"ready": true}`` once models are loaded; 400 ``{"ready": false, "error": why}`` before
        that and for good once draining: the Open Inference Protocol's 4xx for false (probes, no log line)."""
        why = self.control.server_not_ready_reason()
        if why is None:
            return json_response({"ready": True})
        return json_response({"ready": False, "error": why}, 400)

    async def model_ready(self, request: web.Request) -> web.Response:
        """200 ``{"name", "ready": true}``; 400 naming why when not ready, unknown models and versions
        included (the protocol's 4xx for false, as Triton answers)."""
        name = _model(request)
        why = self.control.not_ready_reason(name, _version(request))
        if why is None:
            return json_response({"name": name, "ready": True})
        return json_error(400, f"model {name!r} is not ready: {why}")

    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response(message_json(self.control.server_metadata(EXTENSIONS_EXTRA)))

    async def model_metadata(self, request: web.Request) -> web.Response:
        reply = self.control.model_metadata(_model(request), _version(request))
        return json_response(message_json(reply))

    async def model_config(self, request: web.Request) -> web.Response:
        reply = self.control.model_config(_model(request), _version(request))
        return json_response(message_json(reply.config))

    async def statistics(self, request: web.Request) -> web.Response:
        name = request.match_info.get("model", "")
        return json_response(message_json(self.control.model_statistics(name, _version(request))))

    # ---- model repository ---------------------------------------------------------------------------

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInputError(f"ready: expected true or false, got {ready!r}")
        return json_response(message_json(self.control.repository_index("", ready))["models"])

    async def load(self, request: web.Request) -> web.Response:
        name = _model(request)
        await self.control.load(name, parameters=_repository_parameters(await self._json(request)))
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        name = _model(request)
        await self.control.unload(name, parameters=_repository_parameters(await self._json(request)))
        return web.Response(status=200)

    # ---- inference ----------------------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.Response:
        name = _model(request)
        call = current_call()
        version = parse_version(_version(request), "version")
        # An unknown model is reported as such (404) before a malformed body is (400), as over gRPC.
        self.core.repository.entry(name)
        header_length = request.headers.get(HEADER_LENGTH)
        if header_length is None:  # all of it is JSON: refused by its declared length, before reading it
            json_body.check_size(request.content_length or 0, "request body")
        data = await self._body(request)
        if len(data) <= INLINE_PARSE_BYTES:
            body = parse_body(data, header_length)
        else:
            # One big parse at a time: a JSON parse holds the GIL throughout, so two at once would leave
            # the event loop (and every health probe) waiting behind both.
            async with self._big_parse:
                loop = asyncio.get_running_loop()
                body = await loop.run_in_executor(self.core.pool, parse_body, data, header_length)
        binary = binary_output_names(body)
        request_id = echo_request_id(body.id, "id")
        reply, json_length = await self.core.infer(
            InferenceRequest(
                model=name,
                version=version,
                inputs=lambda cfg: inputs_of(body, cfg),
                outputs=lambda cfg: outputs_of(body, cfg),
                deadline=body.deadline(),
                request_id=call.request_id,
                api=API,
                trace=call,
            ),
            lambda result: encode_reply(result, request_id, binary),
        )
        if json_length is None:
            return web.Response(body=reply, content_type="application/json")
        return web.Response(
            body=reply,
            content_type="application/octet-stream",
            headers={HEADER_LENGTH: str(json_length)},
        )

    # ---- bodies -------------------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> bytes:
        """The request body, refused by its declared length before any of it is read."""
        size = request.content_length
        if size is not None and size > self.max_body:
            raise RequestTooLargeError(
                f"request body: {size} bytes, over the largest message this server accepts "
                f"({self.max_body} bytes, --max-message-bytes)"
            )
        return await request.read()

    async def _json(self, request: web.Request) -> dict[str, Any]:
        """A small JSON object body; an empty body is an empty object."""
        data = await self._body(request)
        if not data.strip():
            return {}
        obj = json_body.loads(data, expected="a JSON object")
        if not isinstance(obj, dict):
            raise InvalidInputError(f"request body: expected a JSON object, got a {type(obj).__name__}")
        return obj


def _model(request: web.Request) -> str:
    name = request.match_info["model"]
    current_call().model = name
    return name


def _repository_parameters(body: dict[str, Any]) -> list[str]:
    """The names of ``{"parameters": {k: bool|int|str}}``, each value's type checked as the protocol's."""
    params = body.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidInputError(f"parameters: expected a JSON object, got {type(params).__name__}")
    for key, value in params.items():
        if not isinstance(value, (bool, int, str)):
            raise InvalidInputError(
                f"parameters[{key!r}]: expected a boolean, integer or string, got {type(value).__name__}"
            )
    return list(params)
