"""Start and stop the REST front end: an aiohttp server in the gRPC server's own event loop."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from ..calls import Calls
from ..core.control import ControlPlane
from ..core.inference import InferenceCore
from ..settings import Settings
from .connection import PipelinedRunner
from .edge import RestEdge
from .routes import Routes

__all__ = ["HttpFrontEnd", "start_http"]

# Seconds aiohttp waits for handlers at stop: the server's drain has already waited for in-flight calls
# (they count in the edge), so what is left is over the grace period and is cancelled promptly.
_CLEANUP_S = 0.5
# At most this long (within the grace) the listener is closed while open connections may still bring one
# more request each: a request already on its way on a connection we closed would be lost unanswered.
_LINGER_S = 0.5


@dataclass
class HttpFrontEnd:
    """A running REST front end and the port it bound."""

    runner: web.AppRunner
    port: int

    async def stop(self, deadline: float | None = None) -> None:
        """Close the listener; until every connection has closed, ``_LINGER_S`` or the monotonic ``deadline``
        pass, serve what arrives on open connections (while draining, every reply says ``Connection:
        close``, so a busy connection ends after its next reply); then close every connection, cancelling
        handlers still running."""
        for site in list(self.runner.sites):
            await site.stop()
        if deadline is not None:
            until = min(deadline, time.monotonic() + _LINGER_S)
            server = self.runner.server
            while server is not None and server.connections and time.monotonic() < until:
                await asyncio.sleep(0.005)  # bounded: aiohttp offers no event for "last connection closed"
        await self.runner.cleanup()


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The gRPC port's TLS (and mTLS) settings for HTTPS, so REST is never the plaintext way in."""
    if not settings.tls_enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca:
        ctx.load_verify_locations(settings.tls_client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def start_http(
    settings: Settings,
    *,
    control: ControlPlane,
    core: InferenceCore,
    edge: Calls,
    tokens: Sequence[bytes],
    reuse_port: bool = False,
) -> HttpFrontEnd:
    """Bind ``settings.host:settings.http_port`` (0 = ephemeral) and serve; raises OSError when busy.
    ``reuse_port``: share the port with sibling worker processes (SO_REUSEPORT)."""
    limit = settings.max_message_bytes
    app = web.Application(middlewares=[RestEdge(edge, tokens).middleware], client_max_size=limit)
    Routes(control, core, limit).add_to(app)
    # handler_cancellation: a client that disconnects cancels its handler, and so its work in the core.
    # PipelinedRunner: pipelined requests before a malformed one are answered, parser errors in v2 JSON.
    runner = PipelinedRunner(
        app, edge, access_log=None, handler_cancellation=True, shutdown_timeout=_CLEANUP_S
    )
    await runner.setup()
    try:
        site = web.TCPSite(
            runner,
            settings.host,
            settings.http_port,
            ssl_context=ssl_context(settings),
            reuse_port=reuse_port,
        )
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    port = int(runner.addresses[0][1])
    return HttpFrontEnd(runner, port)
