"""The call every front end serves: what is known of it, the in-flight count drain waits on, refusal while
draining, the one translation of an exception into a status and its log line, the access log.

The gRPC edge (``server/grpc/edge.py``) and the REST edge (``server/rest/edge.py``) both build on this,
so a call is counted, refused, logged and translated the same way whichever protocol carried it.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from .errors import DrainingError, failure
from .health import Health
from .observability.logs import access_log_enabled, log_access, log_failed_request


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


class Calls:
    """Counts in-flight calls of every front end so shutdown can wait for them; refuses new ones once
    draining began."""

    def __init__(self, health: Health, on_message: Callable[[int], None] | None = None) -> None:
        self.health = health
        self.on_message = on_message  # sees each request message's size (heap trimming after large ones)
        self.in_flight = 0
        self._idle: asyncio.Event | None = None

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
