"""The one inference core every front end calls: lookup, admission, pre/postprocess, infer, accounting.

Front ends (the convserve.v1 and KServe v2 gRPC servicers, the v2 REST handlers) turn their wire format into
an ``InferenceRequest`` and call ``await core.infer(request, encode)``; ``encode`` turns the domain
``InferenceResult`` back into their reply. Nothing here knows a transport: the deadline and the request id
arrive as plain values, cancellation as asyncio task cancellation (or ``request.cancel``), and failures as
domain errors that the edge translates once with ``errors.failure``.

Where each piece of work runs (docs/DESIGN.md, "Execution model"):

- on the event loop: lookup, validation, cost accounting, small decodes (≤ ``INLINE_DECODE_PIXELS``),
  tensor wrapping, top-k and reply building for small replies, single-image runs of a model cheaper than a
  thread hop (``ServedModel.infer`` decides);
- on the bounded CPU pool (``cpu_workers`` threads): decodes of bigger images, admitted by decoded pixels in
  flight (``decode_pixels_in_flight``), big tensor conversions, big postprocessing and reply building;
- on the batcher's threads: every other model run, merged across requests.

Every stage checks the deadline and cancellation before it starts, and pool work checks them between
images and between compressed blocks of one image, so abandoned work stops within milliseconds.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, overload

import numpy as np

from convserve.common.model_config import ModelConfig

from ..errors import (
    ConvserveServerError,
    DeadlineExpiredError,
    InvalidInputError,
    ReplyTooLargeError,
    TooManyImagesError,
    failure,
)
from ..observability.metrics import API_NAMES, Metrics
from ..repository.model_repository import ModelRepository
from ..runtime.batcher import Backpressure
from ..runtime.postprocess import classify, resolve_top_k
from ..runtime.preprocess import ImageLimits, decode_image, open_image, stack, tensor_to_array
from ..runtime.served_model import ServedModel
from ..settings import Settings

__all__ = [
    "Backpressure",
    "Cancellation",
    "EncodedImage",
    "InferenceCore",
    "InferenceRequest",
    "InferenceResult",
    "OutputResult",
    "RequestedOutput",
    "TensorInput",
    "Trace",
    "image_limits",
]

T = TypeVar("T")

# Decoded pixels at or below which a request's images decode on the event loop: a 28x28 PNG decodes in
# ~30 µs, less than a hop to the pool and back; 64K pixels (256x256) take ~1 ms, the most the loop gives.
INLINE_DECODE_PIXELS = 65_536
# Encoded images per request whose headers are read on the loop; more are read in the pool (~20 µs each).
INLINE_HEADERS = 16
# Tensor elements converted/checked on the loop; bigger tensors go to the pool (~1 ms per 1M elements).
INLINE_TENSOR_ELEMENTS = 1_000_000
# Estimated reply bytes built on the loop (~1 ms of work); bigger replies are built in the pool.
INLINE_REPLY_BYTES = 256 * 1024
# Bytes a reply needs beyond its numbers: per classification entry (index, probability, framing), per
# output and per reply. Deliberately generous: the bound must refuse before building, never after.
_ENTRY_OVERHEAD = 24
_REPLY_OVERHEAD = 4096


# ---- domain objects ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """One encoded image (PNG, JPEG, ...); ``where`` names it in error messages, e.g. ``images[2]``."""

    data: bytes
    where: str = "image"


@dataclass(frozen=True, slots=True)
class TensorInput:
    """Raw tensor bytes: (C, H, W) or (N, C, H, W) in ``dtype`` (float32, float16, float64 or uint8)."""

    data: bytes
    dtype: str
    shape: tuple[int, ...]
    where: str = "tensor"

    @property
    def rows(self) -> int:
        return int(self.shape[0]) if len(self.shape) == 4 else 1


Input = EncodedImage | TensorInput


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """One output the client wants: the raw (N, K) tensor (``classification`` None) or the top-k
    classification (``classification`` = k; 0 = the server's default k). ``name`` "" = the model's output."""

    name: str = ""
    classification: int | None = None
    where: str = "top_k"


class Trace(Protocol):
    """What the core reports back about a request as it learns it (the edge's log line reads it)."""

    model: str
    version: str
    images: int | None
    peer: str  # who asks (the connection): the key of fair admission between clients; "" = anonymous


class Cancellation:
    """A one-way flag that stops a request's remaining work; set it from any thread."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


@dataclass(slots=True)
class InferenceRequest:
    """What a front end asks for, in domain terms.

    ``inputs`` and ``outputs`` may be callables of the model's config: a front end whose conversion needs
    the model's spec (its input's name, for an error message) is asked after the lookup, so a request for an
    unknown model reports NOT_FOUND first. ``deadline`` is absolute ``time.monotonic()`` seconds.
    """

    model: str
    inputs: Sequence[Input] | Callable[[ModelConfig], Sequence[Input]]
    version: int = 0
    outputs: Sequence[RequestedOutput] | Callable[[ModelConfig], Sequence[RequestedOutput]] = (
        RequestedOutput(),
    )
    deadline: float | None = None
    request_id: str = ""
    api: str = "classify"  # the metrics label: one of metrics.API_NAMES
    model_field: str = "model"  # names the model field in lookup errors ("model_name" for v2)
    cancel: Cancellation = field(default_factory=Cancellation)
    trace: Trace | None = None  # filled in with the resolved version and the image count
    # A stream's valve: a full model queue makes this request wait for room (up to the deadline) instead of
    # failing with QueueFullError, and the stream stops reading meanwhile (flow control, batcher.py).
    backpressure: Backpressure | None = None


@dataclass(frozen=True, slots=True)
class OutputResult:
    """One requested output: ``raw`` (N, K) float32, or ``indices``/``scores`` (N, k) best first."""

    name: str
    raw: np.ndarray | None = None
    indices: np.ndarray | None = None
    scores: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class InferenceResult:
    """What the core answers: which version ran, how many images, and each requested output in order."""

    model: str
    version: int
    images: int
    labels: tuple[str, ...]
    outputs: tuple[OutputResult, ...]
    request_id: str = ""


def image_limits(settings: Settings) -> ImageLimits:
    """The decode guards the settings ask for."""
    return ImageLimits(
        max_encoded_bytes=settings.max_image_bytes,
        max_pixels=settings.max_image_pixels,
        formats=tuple(f.upper() for f in settings.allowed_image_formats),
    )


# ---- cost-bounded admission -------------------------------------------------------------------------------


class PixelBudget:
    """Decoded pixels in flight, server-wide; waiters are admitted in arrival order (event loop only).

    A request costing more than the whole budget waits until the budget is empty and then runs alone.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_flight = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def acquire(self, pixels: int) -> int:
        cost = min(pixels, self.capacity)
        if not self._waiters and self.in_flight + cost <= self.capacity:
            self.in_flight += cost
            return cost
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((cost, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # admitted just as we were cancelled: give it back
                self.release(cost)
            else:
                self._waiters = collections.deque(w for w in self._waiters if w[1] is not fut)
                self._admit()
            raise
        return cost

    def release(self, cost: int) -> None:
        self.in_flight -= cost
        self._admit()

    def _admit(self) -> None:
        while self._waiters:
            cost, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self.in_flight + cost > self.capacity:
                return
            self._waiters.popleft()
            self.in_flight += cost
            fut.set_result(None)


class _Times:
    """What one request's accounting needs from the stages it got through."""

    __slots__ = ("images", "input_s", "output_s")

    def __init__(self) -> None:
        self.images = 0
        self.input_s: float | None = None
        self.output_s: float | None = None


class _Abandoned(Exception):
    """Raised at a checkpoint of a request whose caller went away (pool threads cannot be cancelled)."""


class _Stop:
    """The checkpoint every stage (and every pool task between images) calls."""

    __slots__ = ("cancel", "deadline", "model")

    def __init__(self, deadline: float | None, cancel: Cancellation, model: str) -> None:
        self.deadline = deadline
        self.cancel = cancel
        self.model = model

    def __call__(self) -> None:
        if self.cancel.is_set():
            raise _Abandoned("request cancelled")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExpiredError(
                f"deadline passed while model {self.model!r} was preparing the request; work stopped"
            )


# ---- the core ---------------------------------------------------------------------------------------------


class InferenceCore:
    """Lookup, admission, preprocessing, inference, postprocessing and accounting, written once."""

    def __init__(self, repository: ModelRepository, settings: Settings, metrics: Metrics) -> None:
        self.repository = repository
        self.settings = settings
        self.metrics = metrics
        self.limits = image_limits(settings)
        self.max_reply_bytes = settings.max_message_bytes
        workers = settings.cpu_workers or os.cpu_count() or 1
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="convserve-cpu")
        self.pixels = PixelBudget(settings.decode_pixels_in_flight)

    def close(self) -> None:
        """Stop the CPU pool; work already handed to it finishes (it checks its stop flag)."""
        self.pool.shutdown(wait=False, cancel_futures=True)

    @overload
    async def infer(self, request: InferenceRequest) -> InferenceResult: ...

    @overload
    async def infer(self, request: InferenceRequest, encode: Callable[[InferenceResult], T]) -> T: ...

    async def infer(
        self, request: InferenceRequest, encode: Callable[[InferenceResult], T] | None = None
    ) -> T | InferenceResult:
        """Run one request end to end and return ``encode(result)`` (or the result itself).

        ``encode`` builds the front end's reply; it runs in the CPU pool when the reply is big. Raises
        domain errors (``errors.py``); the edge maps them with ``errors.failure``.
        """
        start = time.perf_counter()
        api = request.api if request.api in API_NAMES else "other"
        served = self._lookup(request, api)
        trace = request.trace
        if trace is not None:
            trace.version = served.version_label
        stats = served.stats
        stats.started(api)
        code, reason = "OK", ""
        times = _Times()
        try:
            return await self._run(served, request, encode, times)
        except asyncio.CancelledError:
            request.cancel.set()  # work already in the pool stops at its next checkpoint
            code = "CANCELLED"
            raise
        except _Abandoned:
            code = "CANCELLED"
            raise asyncio.CancelledError() from None
        except BaseException as exc:
            f = failure(exc, request.request_id)
            code, reason = f.code.name, f.reason
            raise
        finally:
            stats.finished(
                api, code, reason, time.perf_counter() - start, times.images, times.input_s, times.output_s
            )

    def _lookup(self, request: InferenceRequest, api: str) -> ServedModel:
        """Resolve the version to run; a failed lookup is still counted, under the model label (or "")."""
        try:
            return self.repository.resolve(request.model, request.version, request.model_field)
        except ConvserveServerError as exc:
            if self.metrics.enabled:
                label = request.model if self.repository.knows(request.model) else ""
                with self.metrics.request(label, "", api):
                    self.metrics.failure(label, "", api, exc.reason)
                    raise
            raise

    async def _run(
        self,
        served: ServedModel,
        request: InferenceRequest,
        encode: Callable[[InferenceResult], T] | None,
        times: _Times,
    ) -> T | InferenceResult:
        cfg = served.cfg
        stop = _Stop(request.deadline, request.cancel, served.name)
        outputs, reply_bytes_per_image = self._plan(served, request)
        inputs = request.inputs(cfg) if callable(request.inputs) else request.inputs
        n = self._count(inputs)
        if cfg.unbatched and n > cfg.max_batch_size:
            raise InvalidInputError(
                f"images: {served.name} has no batch dimension (max_batch_size 0); expected shape "
                f"{[cfg.batch_dim, *cfg.input.shape]} (at most {cfg.max_batch_size} image(s)), got {n} images"
            )
        if request.trace is not None:
            request.trace.images = n
        reply_bytes = _REPLY_OVERHEAD + n * reply_bytes_per_image
        if reply_bytes > self.max_reply_bytes:  # refused before any work, not after building it
            raise ReplyTooLargeError(
                f"outputs: the reply for {n} images would be about {reply_bytes} bytes, over the largest "
                f"message this server sends ({self.max_reply_bytes} bytes); request fewer images or classes"
            )
        stop()

        t0 = time.perf_counter()
        batch = await self._preprocess(served, inputs, stop)
        times.input_s = time.perf_counter() - t0
        stop()

        peer = request.trace.peer if request.trace is not None else ""
        raw = await served.infer(batch, request.deadline, request.backpressure, peer)

        t0 = time.perf_counter()

        def finish() -> T | InferenceResult:
            result = InferenceResult(
                model=served.name,
                version=served.version,
                images=n,
                labels=cfg.labels,
                outputs=(_postprocess(raw, outputs[0], cfg),)  # the common case, without a generator
                if len(outputs) == 1
                else tuple(_postprocess(raw, o, cfg) for o in outputs),
                request_id=request.request_id,
            )
            return result if encode is None else encode(result)

        if n * reply_bytes_per_image <= INLINE_REPLY_BYTES:
            reply = finish()
        else:
            stop()
            reply = await self._in_pool(finish)
        times.output_s = time.perf_counter() - t0
        times.images = n
        return reply

    def _plan(
        self, served: ServedModel, request: InferenceRequest
    ) -> tuple[tuple[RequestedOutput, ...], int]:
        """The outputs to build (names checked, k resolved, duplicates refused) and the reply bytes each
        image adds, cached per (model version, requested outputs): most requests ask the same thing."""
        wanted = request.outputs(served.cfg) if callable(request.outputs) else request.outputs
        key = wanted if type(wanted) is tuple else tuple(wanted)
        plans = served.plans  # per version, so an unloaded version takes its plans (and nothing else) along
        plan = plans.get(key)
        if plan is None:
            plan = self._make_plan(served.cfg, key)
            if len(plans) >= 256:  # bounded: odd requests make new keys
                plans.clear()
            plans[key] = plan
        return plan  # type: ignore[return-value]

    def _make_plan(
        self, cfg: ModelConfig, wanted: tuple[RequestedOutput, ...]
    ) -> tuple[tuple[RequestedOutput, ...], int]:
        plan: list[RequestedOutput] = []
        seen: set[str] = set()
        longest_label = max((len(label.encode()) for label in cfg.labels), default=0)
        per_image = 0
        for i, out in enumerate(wanted):
            name = out.name or cfg.output.name
            if name != cfg.output.name:
                raise InvalidInputError(f"outputs[{i}].name: expected {cfg.output.name!r}, got {name!r}")
            if name in seen:
                raise InvalidInputError(
                    f"outputs: {name!r} is requested more than once; expected each output at most once"
                )
            seen.add(name)
            k = out.classification
            if k is None:
                per_image += cfg.num_classes * 4
            else:
                k = resolve_top_k(k, cfg.num_classes, self.settings.top_k, out.where)
                per_image += k * (longest_label + _ENTRY_OVERHEAD)
            plan.append(RequestedOutput(name, k, out.where))
        return tuple(plan), per_image

    def _count(self, inputs: Sequence[Input]) -> int:
        """Images in the request (tensor rows included), refused past the per-request limit."""
        if not inputs:
            raise InvalidInputError(
                "images: expected at least one image (encoded bytes or a tensor), got none"
            )
        limit = self.settings.max_images_per_request
        if len(inputs) > limit:
            raise TooManyImagesError(
                f"images: {len(inputs)} images in one request, over the limit of {limit}; "
                "split the request or raise --max-images-per-request"
            )
        if len(inputs) == 1:  # the common case, without a generator
            only = inputs[0]
            n = only.rows if isinstance(only, TensorInput) else 1
        else:
            n = sum(i.rows if isinstance(i, TensorInput) else 1 for i in inputs)
        if n > limit:
            raise TooManyImagesError(
                f"images (tensor rows included): {n} images in one request, over the limit of {limit}; "
                "split the request or raise --max-images-per-request"
            )
        return n

    async def _preprocess(self, served: ServedModel, inputs: Sequence[Input], stop: _Stop) -> np.ndarray:
        """Inputs → one (N, C, H, W) float32 batch, in request order; expensive parts off the loop."""
        cfg = served.cfg
        if len(inputs) == 1:
            only = inputs[0]
            if type(only) is TensorInput and math.prod(only.shape) <= INLINE_TENSOR_ELEMENTS:
                arr = _tensor(only, cfg)  # the common case: one small tensor, wrapped without a copy
                return arr if arr.ndim == 4 else arr[None]
        parts: list[np.ndarray | None] = [None] * len(inputs)
        encoded: list[int] = []
        big_tensors: list[int] = []
        for i, inp in enumerate(inputs):
            if type(inp) is EncodedImage:
                encoded.append(i)
            elif math.prod(inp.shape) <= INLINE_TENSOR_ELEMENTS:  # type: ignore[union-attr]
                parts[i] = _tensor(inp, cfg)  # type: ignore[arg-type]
            else:
                big_tensors.append(i)
        if big_tensors:
            stop()
            converted = await self._in_pool(
                lambda: [_tensor(inputs[i], cfg) for i in big_tensors]  # type: ignore[arg-type]
            )
            for i, arr in zip(big_tensors, converted, strict=True):
                parts[i] = arr
        if encoded:
            blobs = [inputs[i] for i in encoded]
            for i, arr in zip(encoded, await self._decode(blobs, cfg, stop), strict=True):  # type: ignore[arg-type]
                parts[i] = arr
        return stack(parts)  # type: ignore[arg-type]

    async def _decode(self, blobs: list[EncodedImage], cfg: ModelConfig, stop: _Stop) -> list[np.ndarray]:
        """Decode encoded images: inline when small, else in the pool once their pixels are admitted."""
        limits = self.limits
        if len(blobs) <= INLINE_HEADERS:
            opened = [open_image(b.data, limits, b.where) for b in blobs]
        else:
            opened = await self._in_pool(lambda: [open_image(b.data, limits, b.where) for b in blobs])
        pixels = sum(img.size[0] * img.size[1] for img in opened)

        def decode_all() -> list[np.ndarray]:
            return [
                decode_image(b.data, cfg, limits, b.where, stop, img)
                for b, img in zip(blobs, opened, strict=True)
            ]

        if pixels <= INLINE_DECODE_PIXELS:
            return decode_all()
        cost = await self.pixels.acquire(pixels)
        try:
            stop()
            return await self._in_pool(decode_all)
        finally:
            self.pixels.release(cost)

    async def _in_pool(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the bounded CPU pool; if the caller is cancelled, the work sees its stop flag."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)


def _tensor(inp: TensorInput, cfg: ModelConfig) -> np.ndarray:
    return tensor_to_array(inp.data, inp.dtype, inp.shape, cfg, inp.where)


def _postprocess(raw: np.ndarray, out: RequestedOutput, cfg: ModelConfig) -> OutputResult:
    if out.classification is None:
        return OutputResult(out.name, raw=raw)
    indices, scores = classify(raw, cfg.output.kind, out.classification)
    return OutputResult(out.name, indices=indices, scores=scores)
