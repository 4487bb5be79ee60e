"""Client and AsyncClient against a real server on loopback: inputs, batch, stream, errors, retries, TLS.

Every test runs once per twin (the ``twin`` fixture). Answers are compared with in-process ONNX Runtime
on hand-preprocessed inputs (``reference``), never with stored outputs.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sdk_testing import GRAY, assert_matches, digit_pixels, preprocess

from convserve.client import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    InvalidInputError,
    ModelNotFoundError,
    PermissionDeniedError,
    RetryPolicy,
    ServerBusyError,
    ServerUnavailableError,
    UnauthenticatedError,
)

FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)
NO_RETRY = RetryPolicy(max_attempts=1)


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def still_serves(client: Any, reference: Any) -> None:
    """After an error, a good request on the same client must get the right answer."""
    pixels = digit_pixels(99)
    assert_matches(client.classify(pixels, model=GRAY), reference(preprocess(pixels)[None])[0])


def requests_with_code(handle: Any, code: str) -> float:
    """Requests the server counted with this status, over every label set."""
    return sum(sample.value for family in handle.registry.collect() if family.name == "convserve_requests"
               for sample in family.samples
               if sample.name.endswith("_total") and sample.labels.get("code") == code)


# --- inputs, batch, stream ----------------------------------------------------------------------------------

def test_every_input_kind_gets_the_reference_answer(twin: Any, server: Any, reference: Any,
                                                    tmp_path: Path) -> None:
    client = twin(server.address, model=GRAY)
    pixels = digit_pixels(1)
    expected = reference(preprocess(pixels)[None])[0]
    (tmp_path / "digit.png").write_bytes(png(pixels))
    chw = preprocess(pixels)
    inputs = {
        "path": tmp_path / "digit.png",
        "str path": str(tmp_path / "digit.png"),
        "png bytes": png(pixels),
        "PIL image": Image.fromarray(pixels),
        "uint8 HW": pixels,
        "uint8 HWC": pixels[:, :, None],
        "float32 CHW": chw,
        "float32 NCHW of one": chw[None],
        "float64 CHW": chw.astype(np.float64),
    }
    for kind, image in inputs.items():
        try:
            assert_matches(client.classify(image), expected)
        except AssertionError as exc:
            raise AssertionError(f"{kind}: {exc}") from None
    # A lossy JPEG is sent as it is; the reference decodes the same bytes with Pillow.
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format="JPEG", quality=90)
    decoded = np.asarray(Image.open(io.BytesIO(jpeg.getvalue())).convert("L"))
    assert_matches(client.classify(jpeg.getvalue()), reference(preprocess(decoded)[None])[0])
    # RGB pixels for the 3x16x16 model, top_k 3, an explicit version.
    rgb = digit_pixels(2, size=16, channels=3)
    result = client.classify(rgb, model="rgb", version=1, top_k=3)
    assert len(result) == 3
    assert_matches(result, reference(preprocess(rgb)[None], "rgb", 1)[0], model="rgb", version=1)
    # Version 1 of the two served gray versions answers differently from the latest.
    assert_matches(client.classify(pixels, version=1), reference(chw[None], GRAY, 1)[0], version=1)


def test_batch_is_one_request_with_results_in_order(twin: Any, server: Any, reference: Any) -> None:
    client = twin(server.address, model=GRAY)
    images = [digit_pixels(seed) for seed in range(6)]
    expected = reference(np.stack([preprocess(p) for p in images]))
    mixed = [png(images[0]), images[1], Image.fromarray(images[2]), preprocess(images[3]), *images[4:]]
    results = client.classify_batch(mixed, top_k=2)
    assert len(results) == 6
    for result, probabilities in zip(results, expected, strict=True):
        assert_matches(result, probabilities)
        assert len(result) == 2
    # An (N, C, H, W) float array is N images.
    nchw = np.stack([preprocess(p) for p in images[:3]])
    for result, probabilities in zip(client.classify_batch(nchw), expected[:3], strict=True):
        assert_matches(result, probabilities)


class Counting:
    """An iterable that counts how many images the client has pulled from it."""

    def __init__(self, items: list[Any]) -> None:
        self.items, self.pulled = items, 0

    def __iter__(self) -> Any:
        for item in self.items:
            self.pulled += 1
            yield item


def test_stream_yields_in_order_with_a_bounded_window(twin: Any, server: Any, reference: Any) -> None:
    client = twin(server.address, model=GRAY)
    images = [digit_pixels(seed) for seed in range(40)]
    expected = reference(np.stack([preprocess(p) for p in images]))
    source = Counting(images)
    window = 3
    for i, result in enumerate(client.classify_stream(source, window=window)):
        assert_matches(result, expected[i])
        # Read lazily: at most `window` awaiting replies, plus the one built while waiting for a slot.
        assert source.pulled <= i + 1 + window + 1
    assert i == len(images) - 1
    still_serves(client, reference)


def test_stream_raises_a_failed_image_in_its_place_and_the_client_goes_on(twin: Any, server: Any,
                                                                          reference: Any) -> None:
    client = twin(server.address, model=GRAY)
    good = [digit_pixels(seed) for seed in range(3)]
    expected = reference(np.stack([preprocess(p) for p in good]))
    seen = []
    with pytest.raises(InvalidInputError, match=r"stream\[2\]") as info:
        for result in client.classify_stream([good[0], good[1], b"definitely not an image", good[2]]):
            seen.append(result)
    assert info.value.details and info.value.code.name == "INVALID_ARGUMENT"
    assert len(seen) == 2
    for result, probabilities in zip(seen, expected[:2], strict=True):
        assert_matches(result, probabilities)
    # A client-side bad item (not an image at all) ends the stream the same way.
    seen = []
    with pytest.raises(InvalidInputError, match=r"stream\[1\]: expected a path"):
        for result in client.classify_stream([good[0], 3.5]):
            seen.append(result)
    assert len(seen) == 1
    still_serves(client, reference)


def test_leaving_a_stream_early_cancels_it_and_the_client_goes_on(twin: Any, server: Any,
                                                                  reference: Any) -> None:
    client = twin(server.address, model=GRAY)
    endless = (digit_pixels(i % 7) for i in range(10**9))  # never exhausted: only the cancel ends it
    started = time.monotonic()
    for i, _ in enumerate(client.classify_stream(endless, window=4)):
        if i == 5:
            break
    assert time.monotonic() - started < 10
    still_serves(client, reference)


# --- metadata and health ------------------------------------------------------------------------------------

def test_models_model_ready_and_wait(twin: Any, server: Any) -> None:
    client = twin(server.address)
    client.wait_until_ready(timeout=10)
    assert client.ready() is True
    assert client.health() == "SERVING"
    models = {m.name: m for m in client.models()}
    assert [v.version for v in models[GRAY].versions] == [1, 2]
    assert models[GRAY].ready and all(v.execution_provider == "CPUExecutionProvider" for v in models[GRAY])
    broken = models["broken_onnx"]
    assert not broken.ready and broken.versions[0].state == "failed" and broken.versions[0].reason
    meta = client.model(GRAY)
    assert (meta.name, meta.version, meta.ready) == (GRAY, 2, True)
    assert meta.input.shape == (1, 8, 8) and meta.input.dtype == "float32" and meta.input.color_mode == "L"
    assert meta.labels == tuple(f"class_{i}" for i in range(4))
    assert meta.execution_provider == "CPUExecutionProvider"
    assert client.model(GRAY, version=1).version == 1
    with pytest.raises(ModelNotFoundError):
        client.model("no_such_model")


def test_default_model_is_the_servers_only_model(twin: Any, small_server: Any, reference: Any) -> None:
    only_gray = small_server()
    pixels = digit_pixels(5)
    client = twin(only_gray.address)
    assert_matches(client.classify(pixels), reference(preprocess(pixels)[None])[0])
    assert client.model().name == GRAY


def test_without_a_model_name_a_multi_model_server_is_asked_for_digits_lenet(twin: Any, server: Any) -> None:
    client = twin(server.address, retry=NO_RETRY)
    with pytest.raises(ModelNotFoundError, match="digits_lenet"):
        client.classify(digit_pixels(0))


# --- errors -------------------------------------------------------------------------------------------------

def test_unknown_model_and_version(twin: Any, server: Any, reference: Any) -> None:
    client = twin(server.address)
    with pytest.raises(ModelNotFoundError, match="no_such_model") as info:
        client.classify(digit_pixels(0), model="no_such_model")
    assert info.value.code.name == "NOT_FOUND"
    with pytest.raises(ModelNotFoundError):
        client.classify(digit_pixels(0), model=GRAY, version=9)
    still_serves(client, reference)


def test_invalid_input_names_the_image(twin: Any, server: Any, reference: Any) -> None:
    client = twin(server.address, model=GRAY)
    with pytest.raises(InvalidInputError, match=r"images\[1\]") as info:
        client.classify_batch([digit_pixels(0), b"\x89PNG truncated"])
    assert info.value.code.name == "INVALID_ARGUMENT"
    with pytest.raises(InvalidInputError, match="shape"):
        client.classify(np.zeros((1, 5, 5), np.float32))
    still_serves(client, reference)


def test_server_busy_is_retried_then_raised(twin: Any, small_server: Any, reference: Any) -> None:
    limited = small_server(max_images_per_request=2)
    client = twin(limited.address, model=GRAY, retry=FAST_RETRY)
    before = requests_with_code(limited, "RESOURCE_EXHAUSTED")
    with pytest.raises(ServerBusyError) as info:
        client.classify_batch([digit_pixels(i) for i in range(3)])
    assert info.value.code.name == "RESOURCE_EXHAUSTED" and info.value.details
    assert requests_with_code(limited, "RESOURCE_EXHAUSTED") - before == FAST_RETRY.max_attempts
    still_serves(client, reference)


def test_deadline_expires_and_is_not_retried(twin: Any, server: Any, reference: Any) -> None:
    # "slow" runs ~5-10 ms per 3x48x48 image, unbatched: 64 images cannot finish in 20 ms.
    client = twin(server.address, retry=FAST_RETRY)
    client.wait_until_ready(timeout=10)  # connected first: the deadline is for the work, not the handshake
    images = [digit_pixels(i % 16, size=48, channels=3) for i in range(64)]
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError) as info:
        client.classify_batch(images, model="slow", timeout=0.02)
    assert info.value.code.name == "DEADLINE_EXCEEDED"
    assert time.monotonic() - started < 2.0
    still_serves(client, reference)


def test_connection_refused_is_server_unavailable(twin: Any, refused_address: str) -> None:
    client = twin(refused_address, model=GRAY, retry=FAST_RETRY, timeout=5)
    with pytest.raises(ServerUnavailableError) as info:
        client.classify(digit_pixels(0))
    assert info.value.code.name == "UNAVAILABLE" and refused_address in info.value.details
    assert client.ready() is False
    with pytest.raises(DeadlineExceededError, match=r"not SERVING after 0\.3 s"):
        client.wait_until_ready(timeout=0.3)


def test_bearer_token(twin: Any, small_server: Any, reference: Any, tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text("s3cret-token\n")
    guarded = small_server(auth_token_file=str(tmp_path / "tokens"))
    anonymous = twin(guarded.address, model=GRAY)
    assert anonymous.ready() is True  # health stays open for probes
    with pytest.raises(UnauthenticatedError) as info:
        anonymous.classify(digit_pixels(0))
    assert info.value.code.name == "UNAUTHENTICATED"
    with pytest.raises(UnauthenticatedError):
        twin(guarded.address, model=GRAY, token="wrong").classify(digit_pixels(0))
    still_serves(twin(guarded.address, token="s3cret-token"), reference)


def test_mutual_tls(twin: Any, small_server: Any, certificates: dict[str, Path], reference: Any) -> None:
    secure = small_server(tls_cert=str(certificates["server.pem"]), tls_key=str(certificates["server.key"]),
                            tls_client_ca=str(certificates["ca.pem"]))
    trusted = twin(secure.address, root_certificates=certificates["ca.pem"],
                   client_cert=certificates["client.pem"], client_key=certificates["client.key"].read_bytes())
    still_serves(trusted, reference)
    no_certificate = twin(secure.address, model=GRAY, root_certificates=certificates["ca.pem"],
                          retry=NO_RETRY)
    with pytest.raises(ServerUnavailableError):
        no_certificate.classify(digit_pixels(0))
    plaintext = twin(secure.address, model=GRAY, retry=NO_RETRY)
    with pytest.raises(ServerUnavailableError):
        plaintext.classify(digit_pixels(0))


# --- retries across a restart, both twins at once -----------------------------------------------------------

def test_client_retries_until_a_late_server_starts(small_server: Any, reference: Any) -> None:
    """The server is down when the calls start and comes up on the same port a moment later.

    The port comes from a first server's own bind (port 0), which is then stopped: no probing for free
    ports. Both twins call while it is down, with retries on; a control call with retries off must fail.
    """
    first = small_server()
    port = first.grpc_port
    first.stop()
    target = f"127.0.0.1:{port}"
    with Client(target, model=GRAY, retry=NO_RETRY) as control, pytest.raises(ServerUnavailableError):
        control.classify(digit_pixels(0))

    patient = RetryPolicy(max_attempts=200, initial_backoff_s=0.02, max_backoff_s=0.2, budget_s=30)
    pixels = digit_pixels(7)
    outcomes: dict[str, Any] = {}

    def sync_call() -> None:
        try:
            with Client(target, model=GRAY, retry=patient) as client:
                outcomes["sync"] = client.classify(pixels)
        except Exception as exc:
            outcomes["sync"] = exc

    async def async_call() -> Any:
        async with AsyncClient(target, model=GRAY, retry=patient) as client:
            return await client.classify(pixels)

    def run_async() -> None:
        try:
            outcomes["async"] = asyncio.run(async_call())
        except Exception as exc:
            outcomes["async"] = exc

    callers = [threading.Thread(target=sync_call), threading.Thread(target=run_async)]
    for caller in callers:
        caller.start()
    time.sleep(0.3)  # the server is late on purpose: both calls fail and back off meanwhile
    small_server(grpc_port=port)
    for caller in callers:
        caller.join(timeout=40)
    expected = reference(preprocess(pixels)[None])[0]
    for kind in ("sync", "async"):
        assert not isinstance(outcomes.get(kind), Exception), f"{kind}: {outcomes.get(kind)!r}"
        assert_matches(outcomes[kind], expected)


# --- lifecycle ----------------------------------------------------------------------------------------------

def test_context_managers_close_the_channel(server: Any) -> None:
    with Client(server.address, model=GRAY) as client:
        client.classify(digit_pixels(0))
    with pytest.raises(ValueError, match="closed channel"):  # gRPC's own answer to misuse
        client.classify(digit_pixels(0))

    async def main() -> None:
        async with AsyncClient(server.address, model=GRAY) as aclient:
            await aclient.classify(digit_pixels(0))
            results = [r async for r in aclient.classify_stream(_agen(3))]
            assert len(results) == 3

    asyncio.run(main())


async def _agen(n: int) -> Any:
    for seed in range(n):
        yield digit_pixels(seed)


def test_model_control_unloads_and_reloads(twin: Any, small_server: Any, reference: Any) -> None:
    """load_model / unload_model drive the model-control RPCs; they are refused while control is off."""
    with pytest.raises(PermissionDeniedError) as info:
        twin(small_server().address, model=GRAY).unload_model(GRAY)
    assert "allow-model-control" in info.value.details
    controlled = small_server(allow_model_control=True, auth_tokens=("ctl-token",))
    client = twin(controlled.address, model=GRAY, token="ctl-token", retry=FAST_RETRY)
    unloaded = client.unload_model(GRAY)
    assert unloaded.name == GRAY and not any(v.state == "ready" for v in unloaded.versions)
    with pytest.raises(ServerUnavailableError, match="unloaded by a model-control request"):
        client.classify(digit_pixels(0))
    loaded = client.load_model(GRAY)
    assert any(v.state == "ready" for v in loaded.versions)
    still_serves(client, reference)
