"""Everything the two clients share and nothing that waits: settings, requests, replies, errors, retries.

``Client`` and ``AsyncClient`` only own a channel, call the stub and drive what this module returns.
"""

from __future__ import annotations

import abc
import math
import os
import random
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from convserve.protos.convserve.v1 import classifier_pb2 as pb

from .errors import ConvserveError, InvalidInputError, error_for
from .inputs import ImageInput, to_image, to_images
from .results import (
    BatchingSpec,
    Classification,
    InputSpec,
    ModelInfo,
    ModelMetadata,
    Prediction,
    VersionStatus,
)

DEFAULT_TARGET = "127.0.0.1:8001"
TARGET_ENV = "CONVSERVE_SERVER"
# The model asked for when the caller names none and the server holds several (the bundled one).
FALLBACK_MODEL = "digits_lenet"
DEFAULT_TIMEOUT_S = 30.0
# grpcio's own default receive limit is 4 MiB; a batch of large images needs more.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_STREAM_WINDOW = 64

_STATES = {
    pb.MODEL_STATE_LOADING: "loading",
    pb.MODEL_STATE_READY: "ready",
    pb.MODEL_STATE_FAILED: "failed",
    pb.MODEL_STATE_UNLOADING: "unloading",
}
_DTYPES = {pb.DATA_TYPE_FLOAT32: "float32", pb.DATA_TYPE_UINT8: "uint8", pb.DATA_TYPE_FLOAT16: "float16",
           pb.DATA_TYPE_FLOAT64: "float64"}
_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


# --- settings ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter for calls that failed with a retryable status.

    Classification is idempotent, so retrying it is safe; streams are never retried.
    ``RetryPolicy(max_attempts=1)`` turns retries off.
    """

    max_attempts: int = 5  # including the first
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    budget_s: float = 15.0  # total time from the first attempt after which no new attempt starts
    # CANCELLED: only as sent by a server shutting down, for calls it had not started (see retryable).
    retry_on: frozenset[grpc.StatusCode] = frozenset(
        {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED})

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.initial_backoff_s < 0 or self.multiplier < 1 or self.budget_s < 0:
            raise ValueError(f"invalid retry policy: {self}")



def resolve_target(target: str | None) -> str:
    """The server address: the argument, else ``$CONVSERVE_SERVER``, else 127.0.0.1:8001."""
    return target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET


def channel_options(max_message_bytes: int, keepalive_s: float | None, tls_server_name: str | None,
                    extra: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """gRPC channel arguments; ``extra`` entries win over ours."""
    options: dict[str, Any] = {
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.max_receive_message_length": max_message_bytes,
        # Reconnect quickly after a server restart: the defaults back off to 120 s.
        "grpc.initial_reconnect_backoff_ms": 100,
        "grpc.min_reconnect_backoff_ms": 100,
        "grpc.max_reconnect_backoff_ms": 2000,
    }
    if keepalive_s is not None:
        options["grpc.keepalive_time_ms"] = int(keepalive_s * 1000)
        options["grpc.keepalive_timeout_ms"] = 20_000
        options["grpc.keepalive_permit_without_calls"] = 1
    if tls_server_name:
        options["grpc.ssl_target_name_override"] = tls_server_name
    options.update(extra)
    return list(options.items())


def channel_credentials(tls: bool | None, root_certificates: bytes | str | Path | None,
                        client_cert: bytes | str | Path | None,
                        client_key: bytes | str | Path | None) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for a plaintext channel.

    TLS is on when asked for or when any certificate is given; ``root_certificates=None`` uses the
    system roots. PEM values are bytes, or paths read here once, when the client is made.
    """
    if (client_cert is None) != (client_key is None):
        raise ValueError("mTLS needs both client_cert and client_key")
    if not (tls or root_certificates is not None or client_cert is not None):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(root_certificates), private_key=_pem(client_key),
        certificate_chain=_pem(client_cert))


def _pem(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """Per-call metadata: the bearer token the server checks, if any."""
    if token is None:
        return None
    token = token.strip()
    if not token:
        raise ValueError("token is empty")
    return (("authorization", f"Bearer {token}"),)


# --- requests and replies ---------------------------------------------------------------------------------

def _top_k(top_k: int | None) -> int:
    """None asks for the server's default (5, capped at the model's class count), sent as 0."""
    if top_k is None:
        return 0
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 1:
        raise InvalidInputError(f"top_k: expected a positive integer (None: server default), got {top_k!r}")
    return int(top_k)


def _version(version: int | None) -> int:
    if version is None:
        return 0
    if isinstance(version, bool) or not isinstance(version, int | np.integer) or version < 1:
        raise InvalidInputError(f"version: expected a positive integer (None: the latest), got {version!r}")
    return int(version)


def classify_request(image: ImageInput, model: str, version: int | None,
                     top_k: int | None) -> pb.ClassifyRequest:
    """The request for one image."""
    return pb.ClassifyRequest(model=model, version=_version(version), images=[to_image(image)],
                              top_k=_top_k(top_k))


def batch_request(images: Iterable[ImageInput] | np.ndarray, model: str, version: int | None,
                  top_k: int | None) -> pb.ClassifyRequest:
    """One request carrying many images; a 4-D array counts as N images."""
    converted = to_images(images)
    if not converted:
        raise InvalidInputError("images: expected at least one image, got none")
    return pb.ClassifyRequest(model=model, version=_version(version), images=converted, top_k=_top_k(top_k))


def stream_request_factory(model: str, version: int | None,
                           top_k: int | None) -> Callable[[int, ImageInput], pb.ClassifyRequest]:
    """Checks the stream's settings now; the factory builds request ``seq``, numbered by ``request_id``
    so each reply can be checked against the order."""
    resolved, k = _version(version), _top_k(top_k)

    def build(seq: int, image: ImageInput) -> pb.ClassifyRequest:
        return pb.ClassifyRequest(model=model, version=resolved, images=[to_image(image, f"stream[{seq}]")],
                                  top_k=k, request_id=str(seq))

    return build


def _classification(result: pb.Classification, model: str, version: int) -> Classification:
    return Classification(
        predictions=tuple([Prediction(p.index, p.label, p.probability) for p in result.predictions]),
        model=model, version=version)


def parse_classify(reply: pb.ClassifyResponse, expected: int) -> list[Classification]:
    """The reply's results, one per request image, in request order."""
    if len(reply.results) != expected:
        raise ConvserveError(f"server returned {len(reply.results)} results for {expected} images",
                             grpc.StatusCode.INTERNAL)
    return [_classification(r, reply.model, reply.version) for r in reply.results]


def parse_stream_reply(reply: pb.ClassifyStreamResponse, seq: int) -> Classification:
    """One stream reply → its result; raises the mapped error for a failed request (the stream goes on)."""
    request_id = reply.request_id or reply.response.request_id
    if request_id != str(seq):
        raise ConvserveError(f"stream replies out of order: expected request {seq}, got {request_id!r}",
                             grpc.StatusCode.INTERNAL)
    if reply.error_code:
        code = _STATUS_BY_NUMBER.get(reply.error_code, grpc.StatusCode.UNKNOWN)
        raise error_for(code, f"stream[{seq}]: {reply.error_message}")
    return parse_classify(reply.response, 1)[0]


def describe_request(model: str, version: int | None) -> pb.DescribeModelRequest:
    return pb.DescribeModelRequest(model=model, version=_version(version))


def default_model(reply: pb.ListModelsResponse) -> str:
    """The model used when the caller names none: the server's only model, else ``digits_lenet``."""
    return reply.models[0].name if len(reply.models) == 1 else FALLBACK_MODEL


def _versions(statuses: Iterable[pb.VersionStatus]) -> tuple[VersionStatus, ...]:
    return tuple(VersionStatus(v.version, _STATES.get(v.state, "unknown"), v.reason, v.execution_provider)
                 for v in statuses)


def parse_models(reply: pb.ListModelsResponse) -> list[ModelInfo]:
    return [ModelInfo(m.name, _versions(m.versions)) for m in reply.models]


def unload_request(model: str, version: int | None) -> pb.UnloadModelRequest:
    return pb.UnloadModelRequest(model=model, version=_version(version))


def parse_control(reply: pb.LoadModelResponse | pb.UnloadModelResponse) -> ModelInfo:
    """A model-control reply: the model's versions after the load or unload."""
    return ModelInfo(reply.model.name, _versions(reply.model.versions))


def parse_description(reply: pb.ModelDescription) -> ModelMetadata:
    spec = reply.input
    batching = reply.batching if reply.HasField("batching") else None
    return ModelMetadata(
        name=reply.name, version=reply.version, ready=reply.ready, versions=_versions(reply.versions),
        input=InputSpec(spec.name, _DTYPES.get(spec.dtype, "unspecified"), tuple(spec.shape), spec.layout,
                        spec.color_mode, tuple(spec.mean), tuple(spec.std)),
        labels=tuple(reply.labels), execution_provider=reply.execution_provider,
        max_batch_size=reply.max_batch_size, architecture=reply.architecture,
        batching=None if batching is None else BatchingSpec(
            batching.enabled, batching.max_batch_size, batching.max_queue_delay_us, batching.max_queue_size,
            tuple(batching.preferred_batch_sizes), batching.instances),
    )


def health_request(service: str) -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=service)


def health_status(reply: health_pb2.HealthCheckResponse) -> str:
    """The status's name as the health proto spells it: SERVING, NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN."""
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


# --- errors -----------------------------------------------------------------------------------------------

class _ErrorTranslation:
    """Turns a failed call (``grpc.RpcError``, ``grpc.aio.AioRpcError``) into its ``ConvserveError``.

    A class rather than ``@contextmanager``: it is entered on every call, and this costs a fraction.
    """

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, grpc.RpcError):
            code = exc.code() if callable(getattr(exc, "code", None)) else None
            details = exc.details() if callable(getattr(exc, "details", None)) else None
            raise error_for(code or grpc.StatusCode.UNKNOWN, details or str(exc)) from None


_TRANSLATION = _ErrorTranslation()


def translate_errors() -> _ErrorTranslation:
    """The one place gRPC failures become SDK exceptions; ``with`` it around a call (sync or async)."""
    return _TRANSLATION


# --- deadlines and retries --------------------------------------------------------------------------------

def poll_delay(deadline: float, interval: float = 0.1,
               now: Callable[[], float] = time.monotonic) -> float | None:
    """The pause between readiness polls; None once the deadline has passed."""
    left = deadline - now()
    return None if left <= 0 else min(interval, left)


def not_ready_message(target: str, timeout: float) -> str:
    return f"server at {target} not SERVING after {timeout:g} s"


def deadline_after(timeout: float | None, now: Callable[[], float] = time.monotonic) -> float:
    """A ``time.monotonic()`` deadline; ``math.inf`` for none."""
    return math.inf if timeout is None else now() + timeout


def remaining(deadline: float, now: Callable[[], float] = time.monotonic) -> float | None:
    """Seconds left until the deadline, for gRPC's ``timeout=`` (None: no deadline); never negative."""
    return None if deadline == math.inf else max(0.0, deadline - now())


# gRPC core's own words for a message over the size limit: retrying cannot help.
_SIZE_LIMIT_DETAILS = ("larger than max",)


# When a server shuts down, grpc core cancels the calls that reached it but had not started: the client sees
# CANCELLED with exactly this text, and the call never ran. A call cancelled on this side says so
# ("Locally cancelled by application!", "Channel closed!") and is never retried.
_SERVER_CANCELLED_DETAILS = "CANCELLED"


def retryable(error: ConvserveError, policy: RetryPolicy) -> bool:
    if error.code not in policy.retry_on:
        return False
    if error.code == grpc.StatusCode.CANCELLED and error.details != _SERVER_CANCELLED_DETAILS:
        return False
    return not any(words in error.details for words in _SIZE_LIMIT_DETAILS)


def retry_delays(policy: RetryPolicy, deadline: float = math.inf, *, started: float | None = None,
                 now: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = random.random) -> Generator[float, ConvserveError, None]:
    """The retry schedule: send in each failure, get back how long to sleep before the next attempt.

    Prime with ``next()``. The generator returns (``StopIteration``) when the error is not retryable,
    the attempts are used up, or the sleep would end past the policy's budget (counted from ``started``,
    default now) or the call's deadline. Delays are "full jitter": uniform in
    [0, initial * multiplier**n], capped at ``max_backoff_s``.
    """
    give_up_at = min(deadline, (now() if started is None else started) + policy.budget_s)
    attempt = 1
    error = yield 0.0
    while retryable(error, policy) and attempt < policy.max_attempts:
        ceiling = min(policy.max_backoff_s, policy.initial_backoff_s * policy.multiplier ** (attempt - 1))
        delay = rand() * ceiling
        if now() + delay >= give_up_at:
            return
        attempt += 1
        error = yield delay


Schedule = Generator[float, ConvserveError, None]


def next_delay(schedule: Schedule, error: ConvserveError) -> float | None:
    """How long to sleep before retrying after ``error``; None means give up and raise it."""
    try:
        return schedule.send(error)
    except StopIteration:
        return None


def first_failure(policy: RetryPolicy, deadline: float, started: float) -> Schedule:
    """The schedule of a call whose first attempt (begun at ``started``) just failed, primed.

    Made only on failure, so a call that succeeds pays nothing for retries."""
    schedule = retry_delays(policy, deadline, started=started)
    next(schedule)
    return schedule


# --- shared client state ----------------------------------------------------------------------------------

class ClientBase(abc.ABC):
    """Settings both twins share; the twins add the channel and the calls.

    ``target`` defaults to ``$CONVSERVE_SERVER`` or 127.0.0.1:8001; ``model`` to the server's only
    model (else ``digits_lenet``). ``timeout`` is each unary call's deadline in seconds, retries
    included (None: no deadline). ``retry`` is the ``RetryPolicy``; ``RetryPolicy(max_attempts=1)``
    turns retries off.
    ``token`` is sent as ``authorization: Bearer <token>``. ``root_certificates`` (PEM bytes or a path;
    ``tls=True`` alone uses the system roots) switches to TLS, ``client_cert`` + ``client_key`` add mTLS,
    ``tls_server_name`` overrides the name checked against the server's certificate.
    ``max_message_bytes`` bounds both directions; ``keepalive_s`` enables HTTP/2 keepalive pings;
    ``options`` are extra gRPC channel arguments.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        model: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        token: str | None = None,
        tls: bool | None = None,
        root_certificates: bytes | str | Path | None = None,
        client_cert: bytes | str | Path | None = None,
        client_key: bytes | str | Path | None = None,
        tls_server_name: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        keepalive_s: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = resolve_target(target)
        self.timeout = timeout
        self.retry = RetryPolicy() if retry is None else retry
        self._model = model
        self._metadata = call_metadata(token)
        self._credentials = channel_credentials(tls, root_certificates, client_cert, client_key)
        self._options = channel_options(max_message_bytes, keepalive_s, tls_server_name, options)
        self._open()

    @abc.abstractmethod
    def _open(self) -> None:
        """Create the channel (the sync twin at once; the async twin on first use, inside its loop)."""

    def _new_channel(self, api: Any) -> Any:
        """A channel from ``grpc`` or ``grpc.aio``, which share these two constructors."""
        if self._credentials is None:
            return api.insecure_channel(self.target, options=self._options)
        return api.secure_channel(self.target, self._credentials, options=self._options)

    def _deadline(self, timeout: float | None) -> float:
        return deadline_after(self.timeout if timeout is None else timeout)

    def __repr__(self) -> str:
        scheme = "tls" if self._credentials is not None else "plaintext"
        return f"{type(self).__name__}({self.target!r}, {scheme})"
