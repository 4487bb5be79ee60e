"""What both servicers share: deadlines, per-request metrics, the ordered stream pipeline, model lookup."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

import grpc
import numpy as np

from ..errors import ConvserveServerError, DrainingError, TooManyImagesError
from ..health import Health
from ..interceptors import current_call, error_status, require_message
from ..metrics import Metrics
from ..preprocess import ImageLimits, decode_image
from ..repository import ModelRepository
from ..served_model import ServedModel
from ..settings import Settings

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# Decoding this many encoded bytes or more in one request moves to a worker thread, so a big JPEG
# cannot stall every other call on the event loop; small images decode faster than a thread hop.
DECODE_IN_THREAD_BYTES = 256 * 1024
# Stream messages handled at once per stream; replies still leave in request order.
STREAM_WINDOW = 64


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as absolute ``time.monotonic()`` seconds, or None without one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def image_limits(settings: Settings) -> ImageLimits:
    return ImageLimits(
        max_encoded_bytes=settings.max_image_bytes,
        max_pixels=settings.max_image_pixels,
        formats=tuple(f.upper() for f in settings.allowed_image_formats),
    )


def check_count(n: int, limit: int, where: str = "images") -> None:
    """RESOURCE_EXHAUSTED when a request carries more images than the server accepts at once."""
    if n > limit:
        raise TooManyImagesError(
            f"{where}: {n} images in one request, over the limit of {limit}; "
            "split the request or raise --max-images-per-request"
        )


async def decode_all(
    blobs: list[tuple[str, bytes]], served: ServedModel, limits: ImageLimits
) -> list[np.ndarray]:
    """Decode (where, bytes) pairs → (C, H, W) arrays; big payloads decode in a worker thread."""
    cfg = served.cfg

    def run() -> list[np.ndarray]:
        return [decode_image(data, cfg, limits, where) for where, data in blobs]

    if sum(len(b) for _, b in blobs) >= DECODE_IN_THREAD_BYTES:
        return await asyncio.to_thread(run)
    return run()


@contextlib.contextmanager
def observed(metrics: Metrics, model: str, version: str, api: str) -> Iterator[None]:
    """One request in the metrics: duration, in-flight, status code, and the failure reason when it fails."""
    with metrics.request(model, version, api):
        try:
            yield
        except ConvserveServerError as exc:
            metrics.failure(model, version, api, exc.reason)
            raise
        except asyncio.CancelledError:
            raise
        except Exception:
            metrics.failure(model, version, api, "internal")
            raise


def lookup(
    repository: ModelRepository, metrics: Metrics, name: str, version: int, api: str, where: str = "model"
) -> ServedModel:
    """Resolve the model version to run; a failed lookup is still counted as a request in the metrics."""
    try:
        return repository.resolve(name, version, where)
    except ConvserveServerError:
        label = name if repository.knows(name) else ""
        with observed(metrics, label, "", api):
            raise


async def ordered_pipeline(
    requests: AsyncIterable[Req], handle: Callable[[Req], Awaitable[Resp]], window: int = STREAM_WINDOW
) -> AsyncIterator[Resp]:
    """Start handling each stream message as it arrives (at most ``window`` at once); yield replies in order.

    ``handle`` must turn its own errors into reply messages: one bad message never ends the stream.
    """
    queue: asyncio.Queue[asyncio.Future[Resp] | None] = asyncio.Queue(window)
    broken: list[Exception] = []

    async def read() -> None:
        try:
            async for request in requests:
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
    handle: Callable[[Req], Awaitable[Resp]],
    reply_error: Callable[[Req, grpc.StatusCode, str], Resp],
) -> AsyncIterator[Resp]:
    """The servicers' streaming RPCs: each message gets ``handle``'s reply, or ``reply_error``'s for its
    failure, in request order; a failed message (or a drain) never ends the stream."""
    call = current_call()

    async def one(request: Req) -> Resp:
        try:
            require_message(request)
            if health.draining:
                raise DrainingError("server is shutting down; this stream accepts no new requests")
            return await handle(request)
        except Exception as exc:  # reported in the stream; the stream goes on
            code, message = error_status(exc, call)
            return reply_error(request, code, message)

    async for reply in ordered_pipeline(requests, one):
        yield reply
