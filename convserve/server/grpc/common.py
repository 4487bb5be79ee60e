"""What both gRPC servicers share: the call's deadline and the ordered stream pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable
from typing import TypeVar

import grpc

from ..calls import current_call, error_status
from ..errors import DrainingError
from ..health import Health
from ..runtime.batcher import Backpressure
from .edge import require_message

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# Stream messages handled at once per stream; replies still leave in request order.
STREAM_WINDOW = 64


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as absolute ``time.monotonic()`` seconds, or None without one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def ordered_pipeline(
    requests: AsyncIterable[Req],
    handle: Callable[[Req], Awaitable[Resp]],
    window: int = STREAM_WINDOW,
    valve: Backpressure | None = None,
) -> AsyncGenerator[Resp, None]:
    """Start handling each stream message as it arrives (at most ``window`` at once); yield replies in order.

    While ``valve`` is shut (a message waits for room in a full model queue) no further message is read,
    so HTTP/2 flow control slows the client down instead of its messages being refused.
    ``handle`` must turn its own errors into reply messages: one bad message never ends the stream.
    """
    queue: asyncio.Queue[asyncio.Future[Resp] | None] = asyncio.Queue(window)
    broken: list[Exception] = []

    async def read() -> None:
        try:
            it = aiter(requests)
            while True:
                if valve is not None and valve.shut:
                    await valve.wait_open()
                try:
                    request = await anext(it)
                except StopAsyncIteration:
                    break
                await queue.put(asyncio.ensure_future(handle(request)))
        except Exception as exc:  # the client broke the stream: answer what was read, then fail
            broken.append(exc)
        await queue.put(None)

    reader = asyncio.create_task(read())
    try:
        while (task := await queue.get()) is not None:
            yield await task
        if broken:
            raise broken[0]
    finally:
        reader.cancel()
        while not queue.empty():
            leftover = queue.get_nowait()
            if leftover is not None:
                leftover.cancel()


async def stream_replies(
    requests: AsyncIterable[Req],
    health: Health,
    handle: Callable[[Req, Backpressure], Awaitable[Resp]],
    reply_error: Callable[[Req, grpc.StatusCode, str], Resp],
) -> AsyncGenerator[Resp, None]:
    """The servicers' streaming RPCs: each message gets ``handle``'s reply, or ``reply_error``'s for its
    failure, in request order; a failed message (or a drain) never ends the stream. ``handle`` passes the
    stream's valve on to the core: a full model queue pauses reading instead of failing messages."""
    call = current_call()
    valve = Backpressure()

    async def one(request: Req) -> Resp:
        try:
            require_message(request)
            if health.draining:
                raise DrainingError("server is shutting down; this stream accepts no new requests")
            return await handle(request, valve)
        except Exception as exc:  # reported in the stream; the stream goes on
            code, message = error_status(exc, call)
            return reply_error(request, code, message)

    async with contextlib.aclosing(ordered_pipeline(requests, one, valve=valve)) as replies:
        async for reply in replies:
            yield reply
