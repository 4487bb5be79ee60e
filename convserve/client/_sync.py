"""The blocking client: owns one ``grpc.Channel`` and drives ``_core`` with ``time.sleep``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2_grpc

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc as pb_grpc

from . import _core as core
from .errors import ConvserveError, DeadlineExceededError, ServerUnavailableError
from .inputs import ImageInput
from .results import Classification, ModelInfo, ModelMetadata

T = TypeVar("T")


class Client(core.ClientBase):
    """A blocking convserve client: one channel reused by every call, closed by ``close()``.

    >>> with Client("127.0.0.1:8001") as client:
    ...     print(client.classify("digit.png"))

    Settings are described on ``ClientBase``. Safe to share between threads.
    """

    def _open(self) -> None:
        self._channel: grpc.Channel = self._new_channel(grpc)
        self._stub = pb_grpc.ClassifierStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def classify(self, image: ImageInput, *, model: str | None = None, version: int | None = None,
                 top_k: int | None = None, timeout: float | None = None) -> Classification:
        """Classify one image: a path, encoded bytes, a PIL image or a numpy array (see ``inputs``).

        >>> client.classify("seven.png").label
        '7'
        """
        request = core.classify_request(image, self._model_name(model), version, top_k)
        return core.parse_classify(self._call(self._stub.Classify, request, timeout), 1)[0]

    def classify_batch(self, images: Iterable[ImageInput] | np.ndarray, *, model: str | None = None,
                       version: int | None = None, top_k: int | None = None,
                       timeout: float | None = None) -> list[Classification]:
        """Classify many images in one request; results come back in input order.

        >>> [r.label for r in client.classify_batch(["a.png", "b.png"])]
        ['3', '8']
        """
        request = core.batch_request(images, self._model_name(model), version, top_k)
        return core.parse_classify(self._call(self._stub.Classify, request, timeout), len(request.images))

    def classify_stream(self, images: Iterable[ImageInput], *, model: str | None = None,
                        version: int | None = None, top_k: int | None = None,
                        window: int = core.DEFAULT_STREAM_WINDOW,
                        timeout: float | None = None) -> Iterator[Classification]:
        """Classify an iterable of images over the bidirectional stream, yielding results in order.

        The iterable is read lazily with at most ``window`` requests awaiting replies. A failed image
        raises its error at its place in the order. ``timeout`` bounds the whole stream (default
        none); streams are not retried.

        >>> for result in client.classify_stream(paths):
        ...     print(result.label)
        """
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        build = core.stream_request_factory(self._model_name(model), version, top_k)
        slots = threading.Semaphore(window)
        finished = threading.Event()
        failure: list[BaseException] = []

        def send() -> Iterator[pb.ClassifyRequest]:
            # Runs on gRPC's sending thread; blocks while `window` requests await replies.
            try:
                for seq, image in enumerate(images):
                    request = build(seq, image)
                    while not slots.acquire(timeout=0.05):
                        if finished.is_set():
                            return
                    if finished.is_set():
                        return
                    yield request
            except Exception as exc:  # a bad image or a failing iterable: end the stream, raise it in order
                failure.append(exc)

        call = self._stub.ClassifyStream(send(), timeout=timeout, metadata=self._metadata)
        try:
            with core.translate_errors():
                for seq, reply in enumerate(call):
                    slots.release()
                    yield core.parse_stream_reply(reply, seq)
            if failure:
                raise failure[0]
        finally:
            finished.set()
            call.cancel()

    def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model on the server with its versions, states and execution providers."""
        return core.parse_models(self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout))

    def model(self, name: str | None = None, *, version: int | None = None,
              timeout: float | None = None) -> ModelMetadata:
        """One model's metadata (default: the client's model): input spec, labels, provider, batching."""
        request = core.describe_request(self._model_name(name), version)
        return core.parse_description(self._call(self._stub.DescribeModel, request, timeout))

    def load_model(self, name: str, *, timeout: float | None = None) -> ModelInfo:
        """(Re)load a model from the server's repository; needs ``--allow-model-control`` and auth.

        New versions load before old ones retire, so the model keeps answering. Not retried.
        """
        request = pb.LoadModelRequest(model=name)
        return core.parse_control(self._call(self._stub.LoadModel, request, timeout, retry=False))

    def unload_model(self, name: str, *, version: int | None = None,
                     timeout: float | None = None) -> ModelInfo:
        """Stop serving one version, or the whole model (until ``load_model``). Not retried."""
        request = core.unload_request(name, version)
        return core.parse_control(self._call(self._stub.UnloadModel, request, timeout, retry=False))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The standard gRPC health status of the server ("") or one service: ``SERVING``, ``NOT_SERVING``...

        Raises ``ServerUnavailableError`` when the server cannot be reached. Not retried: it reports now.
        """
        with core.translate_errors():
            reply = self._health.Check(core.health_request(service), metadata=self._metadata,
                                       timeout=core.remaining(self._deadline(timeout)))
        return core.health_status(reply)

    def ready(self, *, timeout: float | None = None) -> bool:
        """True when the server's health service says SERVING; False when it says otherwise or is down."""
        try:
            return self.health(timeout=timeout) == "SERVING"
        except (ServerUnavailableError, DeadlineExceededError):
            return False

    def wait_until_ready(self, timeout: float = 30.0) -> None:
        """Block until the server is SERVING; ``DeadlineExceededError`` after ``timeout`` seconds."""
        deadline = core.deadline_after(timeout)
        while True:
            try:
                with core.translate_errors():
                    # wait_for_ready: the call waits for a connection instead of failing fast.
                    reply = self._health.Check(core.health_request(""), wait_for_ready=True,
                                               metadata=self._metadata,
                                               timeout=core.remaining(deadline))
                if core.health_status(reply) == "SERVING":
                    return
            except (ServerUnavailableError, DeadlineExceededError):
                pass
            pause = core.poll_delay(deadline)
            if pause is None:
                raise DeadlineExceededError(core.not_ready_message(self.target, timeout))
            time.sleep(pause)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _model_name(self, model: str | None) -> str:
        if model:
            return model
        if self._model is None:
            self._model = core.default_model(self._call(self._stub.ListModels, pb.ListModelsRequest(), None))
        return self._model

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None, *,
              retry: bool = True) -> T:
        """One unary call under the deadline, with the metadata, retried on the schedule (if ``retry``)."""
        started = time.monotonic()
        deadline = self._deadline(timeout)
        schedule = None
        while True:
            try:
                with core.translate_errors():
                    return method(request, timeout=core.remaining(deadline), metadata=self._metadata)
            except ConvserveError as error:
                if not retry:
                    raise
                schedule = schedule or core.first_failure(self.retry, deadline, started)
                delay = core.next_delay(schedule, error)
                if delay is None:
                    raise
            time.sleep(delay)
