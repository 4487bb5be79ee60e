"""The asyncio client: owns one ``grpc.aio.Channel`` and drives ``_core`` with ``asyncio.sleep``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2_grpc

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc as pb_grpc

from . import _core as core
from .errors import ConvserveError, DeadlineExceededError, ServerUnavailableError
from .inputs import ImageInput
from .results import Classification, ModelInfo, ModelMetadata


class AsyncClient(core.ClientBase):
    """The asyncio twin of ``Client``: the same methods as coroutines; streams are async iterators.

    >>> async with AsyncClient("127.0.0.1:8001") as client:
    ...     print(await client.classify("digit.png"))

    The channel opens on first use, inside the running event loop, and belongs to that loop.
    """

    def _open(self) -> None:
        self._channel: grpc.aio.Channel | None = None

    def _connect(self) -> None:
        if self._channel is None:
            self._channel = self._new_channel(grpc.aio)
            self._classifier = pb_grpc.ClassifierStub(self._channel)
            self._health_stub = health_pb2_grpc.HealthStub(self._channel)

    @property
    def _stub(self) -> pb_grpc.ClassifierStub:
        self._connect()
        return self._classifier

    @property
    def _health(self) -> health_pb2_grpc.HealthStub:
        self._connect()
        return self._health_stub

    async def classify(self, image: ImageInput, *, model: str | None = None, version: int | None = None,
                       top_k: int | None = None, timeout: float | None = None) -> Classification:
        """Classify one image: a path, encoded bytes, a PIL image or a numpy array (see ``inputs``)."""
        request = core.classify_request(image, await self._model_name(model), version, top_k)
        return core.parse_classify(await self._call(self._stub.Classify, request, timeout), 1)[0]

    async def classify_batch(self, images: Iterable[ImageInput] | np.ndarray, *, model: str | None = None,
                             version: int | None = None, top_k: int | None = None,
                             timeout: float | None = None) -> list[Classification]:
        """Classify many images in one request; results come back in input order."""
        request = core.batch_request(images, await self._model_name(model), version, top_k)
        reply = await self._call(self._stub.Classify, request, timeout)
        return core.parse_classify(reply, len(request.images))

    async def classify_stream(self, images: Iterable[ImageInput] | AsyncIterable[ImageInput], *,
                              model: str | None = None, version: int | None = None,
                              top_k: int | None = None,
                              window: int = core.DEFAULT_STREAM_WINDOW,
                              timeout: float | None = None) -> AsyncIterator[Classification]:
        """Classify a (sync or async) iterable of images over the stream, yielding results in order.

        >>> async for result in client.classify_stream(paths):
        ...     print(result.label)
        """
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        build = core.stream_request_factory(await self._model_name(model), version, top_k)
        slots = asyncio.Semaphore(window)
        failure: list[BaseException] = []

        async def send() -> AsyncIterator[pb.ClassifyRequest]:
            # Consumed by gRPC's sending task; waits while `window` requests await replies.
            try:
                seq = 0
                async for image in _aiter(images):
                    request = build(seq, image)
                    await slots.acquire()
                    yield request
                    seq += 1
            except Exception as exc:  # a bad image or a failing iterable: end the stream, raise it in order
                failure.append(exc)

        call = self._stub.ClassifyStream(send(), timeout=timeout, metadata=self._metadata)
        try:
            with core.translate_errors():
                seq = 0
                async for reply in call:
                    slots.release()
                    yield core.parse_stream_reply(reply, seq)
                    seq += 1
            if failure:
                raise failure[0]
        finally:
            call.cancel()

    async def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model on the server with its versions, states and execution providers."""
        return core.parse_models(await self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout))

    async def model(self, name: str | None = None, *, version: int | None = None,
                    timeout: float | None = None) -> ModelMetadata:
        """One model's metadata (default: the client's model): input spec, labels, provider, batching."""
        request = core.describe_request(await self._model_name(name), version)
        return core.parse_description(await self._call(self._stub.DescribeModel, request, timeout))

    async def load_model(self, name: str, *, timeout: float | None = None) -> ModelInfo:
        """(Re)load a model from the server's repository; needs ``--allow-model-control`` and auth.

        New versions load before old ones retire, so the model keeps answering. Not retried.
        """
        request = pb.LoadModelRequest(model=name)
        return core.parse_control(await self._call(self._stub.LoadModel, request, timeout, retry=False))

    async def unload_model(self, name: str, *, version: int | None = None,
                     timeout: float | None = None) -> ModelInfo:
        """Stop serving one version, or the whole model (until ``load_model``). Not retried."""
        request = core.unload_request(name, version)
        return core.parse_control(await self._call(self._stub.UnloadModel, request, timeout, retry=False))

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The standard gRPC health status of the server ("") or one service: ``SERVING``, ``NOT_SERVING``...

        Raises ``ServerUnavailableError`` when the server cannot be reached. Not retried: it reports now.
        """
        with core.translate_errors():
            reply = await self._health.Check(core.health_request(service), metadata=self._metadata,
                                             timeout=core.remaining(self._deadline(timeout)))
        return core.health_status(reply)

    async def ready(self, *, timeout: float | None = None) -> bool:
        """True when the server's health service says SERVING; False when it says otherwise or is down."""
        try:
            return await self.health(timeout=timeout) == "SERVING"
        except (ServerUnavailableError, DeadlineExceededError):
            return False

    async def wait_until_ready(self, timeout: float = 30.0) -> None:
        """Wait until the server is SERVING; ``DeadlineExceededError`` after ``timeout`` seconds."""
        deadline = core.deadline_after(timeout)
        while True:
            try:
                with core.translate_errors():
                    # wait_for_ready: the call waits for a connection instead of failing fast.
                    reply = await self._health.Check(core.health_request(""), wait_for_ready=True,
                                                     metadata=self._metadata,
                                                     timeout=core.remaining(deadline))
                if core.health_status(reply) == "SERVING":
                    return
            except (ServerUnavailableError, DeadlineExceededError):
                pass
            pause = core.poll_delay(deadline)
            if pause is None:
                raise DeadlineExceededError(core.not_ready_message(self.target, timeout))
            await asyncio.sleep(pause)

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        if self._channel is not None:
            await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _model_name(self, model: str | None) -> str:
        if model:
            return model
        if self._model is None:
            reply = await self._call(self._stub.ListModels, pb.ListModelsRequest(), None)
            self._model = core.default_model(reply)
        return self._model

    async def _call(self, method: Callable[..., Any], request: Any, timeout: float | None, *,
                    retry: bool = True) -> Any:
        """One unary call under the deadline, with the metadata, retried on the schedule (if ``retry``)."""
        started = time.monotonic()
        deadline = self._deadline(timeout)
        schedule = None
        while True:
            try:
                with core.translate_errors():
                    return await method(request, timeout=core.remaining(deadline), metadata=self._metadata)
            except ConvserveError as error:
                if not retry:
                    raise
                schedule = schedule or core.first_failure(self.retry, deadline, started)
                delay = core.next_delay(schedule, error)
                if delay is None:
                    raise
            await asyncio.sleep(delay)


async def _aiter(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
