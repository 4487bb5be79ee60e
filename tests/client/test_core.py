"""The SDK's pure parts without a server: retry schedule, error mapping, request building, reply parsing."""

from __future__ import annotations

import inspect
import io
import math
import subprocess
import sys

import grpc
import numpy as np
import pytest
from PIL import Image

import convserve.client as sdk
from convserve.client import _core as core
from convserve.client import errors
from convserve.client.inputs import encode_png, to_image, to_images
from convserve.protos.convserve.v1 import classifier_pb2 as pb

# --- retry schedule ---------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def unavailable() -> sdk.ConvserveError:
    return errors.error_for(grpc.StatusCode.UNAVAILABLE, "connection refused")


def drive(policy: core.RetryPolicy, failures: list[sdk.ConvserveError], deadline: float = math.inf,
          rand: float = 1.0) -> list[float]:
    """The delays the schedule hands out for a sequence of failures, advancing a fake clock by each sleep."""
    clock = FakeClock()
    schedule = core.retry_delays(policy, clock.t + (deadline - 100.0 if deadline != math.inf else math.inf),
                                 now=clock, rand=lambda: rand)
    assert next(schedule) == 0.0
    delays = []
    for error in failures:
        delay = core.next_delay(schedule, error)
        if delay is None:
            break
        delays.append(delay)
        clock.t += delay
    return delays


def test_backoff_grows_exponentially_and_is_capped() -> None:
    policy = core.RetryPolicy(max_attempts=7, initial_backoff_s=0.1, multiplier=2.0, max_backoff_s=0.5,
                              budget_s=100.0)
    assert drive(policy, [unavailable()] * 10) == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5, 0.5])


def test_jitter_scales_the_ceiling() -> None:
    policy = core.RetryPolicy(max_attempts=4, initial_backoff_s=0.1, multiplier=2.0, budget_s=100.0)
    assert drive(policy, [unavailable()] * 5, rand=0.25) == pytest.approx([0.025, 0.05, 0.1])


def test_max_attempts_counts_the_first_call() -> None:
    assert len(drive(core.RetryPolicy(max_attempts=3), [unavailable()] * 5)) == 2
    assert drive(core.RetryPolicy(max_attempts=1), [unavailable()]) == []


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                  grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAUTHENTICATED,
                                  grpc.StatusCode.INTERNAL])
def test_only_unavailable_and_resource_exhausted_are_retried(code: grpc.StatusCode) -> None:
    assert drive(core.RetryPolicy(), [errors.error_for(code, "no")]) == []
    busy = errors.error_for(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
    assert len(drive(core.RetryPolicy(), [busy])) == 1


def test_oversize_message_is_not_retried() -> None:
    too_big = errors.error_for(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               "Received message larger than max (5000000 vs. 4194304)")
    assert drive(core.RetryPolicy(), [too_big]) == []


def test_budget_and_deadline_stop_retries() -> None:
    policy = core.RetryPolicy(max_attempts=100, initial_backoff_s=1.0, multiplier=1.0, budget_s=3.5)
    assert drive(policy, [unavailable()] * 100) == [1.0, 1.0, 1.0]  # a 4th sleep would end past 3.5 s
    no_budget_limit = core.RetryPolicy(max_attempts=100, initial_backoff_s=1.0, multiplier=1.0, budget_s=1e9)
    assert drive(no_budget_limit, [unavailable()] * 100, deadline=102.5) == [1.0, 1.0]


def test_invalid_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        core.RetryPolicy(max_attempts=0)


# --- errors -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("code", "kind"), [
    (grpc.StatusCode.INVALID_ARGUMENT, sdk.InvalidInputError),
    (grpc.StatusCode.NOT_FOUND, sdk.ModelNotFoundError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, sdk.ServerBusyError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, sdk.DeadlineExceededError),
    (grpc.StatusCode.UNAVAILABLE, sdk.ServerUnavailableError),
    (grpc.StatusCode.UNAUTHENTICATED, sdk.UnauthenticatedError),
    (grpc.StatusCode.PERMISSION_DENIED, sdk.PermissionDeniedError),
    (grpc.StatusCode.INTERNAL, sdk.ConvserveError),
    (grpc.StatusCode.UNKNOWN, sdk.ConvserveError),
])
def test_status_maps_to_exception(code: grpc.StatusCode, kind: type[sdk.ConvserveError]) -> None:
    error = errors.error_for(code, "what happened")
    assert type(error) is kind
    assert error.code is code and error.details == "what happened"
    assert str(error) == f"what happened [{code.name}]"
    assert error.user_facing is True


def test_every_exception_class_is_user_facing_and_has_its_own_default_code() -> None:
    for kind, code in [(errors.ERROR_BY_STATUS[c], c) for c in errors.ERROR_BY_STATUS]:
        assert kind.user_facing is True
        assert kind("x").code is code


def test_translate_errors_maps_an_aio_rpc_error() -> None:
    aio_error = grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                     details="model 'nope' not found")
    with pytest.raises(sdk.ModelNotFoundError, match="'nope' not found") as info, core.translate_errors():
        raise aio_error
    assert info.value.code is grpc.StatusCode.NOT_FOUND


def test_translate_errors_maps_a_real_sync_failure(refused_address: str) -> None:
    # A real call to a port nobody listens on: gRPC's own UNAVAILABLE, no server needed.
    with grpc.insecure_channel(refused_address) as channel:
        method = channel.unary_unary("/convserve.v1.Classifier/ListModels")
        with pytest.raises(sdk.ServerUnavailableError) as info, core.translate_errors():
            method(b"", timeout=5)
    assert info.value.code is grpc.StatusCode.UNAVAILABLE and info.value.details


# --- requests ---------------------------------------------------------------------------------------------

def png_bytes(mode: str = "L", size: tuple[int, int] = (8, 6)) -> bytes:
    rng = np.random.default_rng(0)
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode=mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("channels", [None, 1, 2, 3, 4])
def test_encode_png_round_trips_through_pillow(channels: int | None) -> None:
    rng = np.random.default_rng(channels or 0)
    shape = (5, 7) if channels is None else (5, 7, channels)
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(encode_png(pixels))))
    np.testing.assert_array_equal(decoded, pixels if channels in (None, 2, 3, 4) else pixels[:, :, 0])


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint16), np.zeros((4, 4, 5), np.uint8),
                                 np.zeros((0, 4), np.uint8), np.zeros(4, np.uint8)])
def test_encode_png_refuses_what_is_not_pixels(bad: np.ndarray) -> None:
    with pytest.raises(sdk.InvalidInputError):
        encode_png(bad)


def test_path_and_bytes_are_sent_as_they_are(tmp_path) -> None:
    data = png_bytes()
    (tmp_path / "x.png").write_bytes(data)
    assert to_image(tmp_path / "x.png").encoded == data
    assert to_image(str(tmp_path / "x.png")).encoded == data
    assert to_image(data).encoded == data
    assert to_image(bytearray(data)).encoded == data
    assert to_image(memoryview(data)).encoded == data


def test_unreadable_file_is_an_invalid_input(tmp_path) -> None:
    with pytest.raises(sdk.InvalidInputError, match=r"cannot read image file .*missing\.png"):
        to_image(tmp_path / "missing.png")


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "CMYK", "P", "I;16"])
def test_pil_image_is_encoded_as_png_keeping_its_pixels(mode: str) -> None:
    img = Image.open(io.BytesIO(png_bytes("RGB"))).convert(mode)
    decoded = Image.open(io.BytesIO(to_image(img).encoded))
    assert decoded.format == "PNG"
    reference = img.convert("RGB") if mode == "CMYK" else img
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(reference))


def test_float_arrays_become_little_endian_tensors() -> None:
    chw = np.random.default_rng(1).standard_normal((1, 4, 3)).astype(">f4")  # big-endian on purpose
    image = to_image(chw)
    assert image.WhichOneof("content") == "tensor"
    assert image.tensor.dtype == pb.DATA_TYPE_FLOAT32 and list(image.tensor.shape) == [1, 4, 3]
    np.testing.assert_array_equal(np.frombuffer(image.tensor.data, "<f4").reshape(1, 4, 3), chw)
    half = to_image(chw.astype(np.float16))
    assert half.tensor.dtype == pb.DATA_TYPE_FLOAT16 and len(half.tensor.data) == 12 * 2


def test_batch_arrays_split_into_one_image_each() -> None:
    nchw = np.random.default_rng(2).random((3, 1, 4, 4), dtype=np.float32)
    images = to_images(nchw)
    assert len(images) == 3
    for i, image in enumerate(images):
        np.testing.assert_array_equal(np.frombuffer(image.tensor.data, np.float32).reshape(1, 4, 4), nchw[i])
    nhwc = np.zeros((2, 5, 5, 3), np.uint8)
    assert [im.WhichOneof("content") for im in to_images(nhwc)] == ["encoded", "encoded"]
    with pytest.raises(sdk.InvalidInputError, match="use classify_batch"):
        to_image(nchw)
    assert len(to_image(nchw[:1]).tensor.data) == 16 * 4  # a batch of one is one image


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.float32), np.zeros((1, 4, 4), np.int32), 3.5,
                                 ["nested"], None])
def test_unsupported_inputs_are_refused(bad: object) -> None:
    with pytest.raises(sdk.InvalidInputError):
        to_image(bad)  # type: ignore[arg-type]


def test_a_single_image_is_not_a_batch() -> None:
    with pytest.raises(sdk.InvalidInputError, match="use classify"):
        to_images("one.png")


def test_request_building_checks_top_k_version_and_emptiness() -> None:
    request = core.classify_request(b"png", "digits_lenet", None, 3)
    assert (request.model, request.version, request.top_k, len(request.images)) == ("digits_lenet", 0, 3, 1)
    assert core.classify_request(b"png", "m", None, None).top_k == 0  # the server's default
    assert core.classify_request(b"png", "m", 2, 1).version == 2
    for top_k in (0, -1, 2.5, True):
        with pytest.raises(sdk.InvalidInputError, match="top_k"):
            core.classify_request(b"png", "m", None, top_k)  # type: ignore[arg-type]
    with pytest.raises(sdk.InvalidInputError, match="version"):
        core.classify_request(b"png", "m", 0, 1)
    with pytest.raises(sdk.InvalidInputError, match="at least one image"):
        core.batch_request([], "m", None, 1)
    build = core.stream_request_factory("m", None, 2)
    assert build(7, b"x").request_id == "7"


# --- replies ----------------------------------------------------------------------------------------------

def reply(*tops: tuple[int, str, float], model: str = "m", version: int = 3) -> pb.ClassifyResponse:
    return pb.ClassifyResponse(model=model, version=version, results=[
        pb.Classification(predictions=[pb.Prediction(index=i, label=label, probability=p)])
        for i, label, p in tops])


def test_parse_classify_keeps_order_and_version() -> None:
    results = core.parse_classify(reply((7, "7", 0.5), (1, "1", 0.25)), 2)
    assert [r.label for r in results] == ["7", "1"]
    assert results[0] == sdk.Classification((sdk.Prediction(7, "7", 0.5),), "m", 3)
    assert list(results[1]) == [sdk.Prediction(1, "1", 0.25)] and results[1].top.index == 1
    assert str(results[0]) == "7 (50.0%)  [m v3]"
    with pytest.raises(sdk.ConvserveError, match="2 results for 3 images"):
        core.parse_classify(reply((7, "7", 0.5), (1, "1", 0.25)), 3)


def test_parse_stream_reply_checks_order_and_maps_errors() -> None:
    ok = pb.ClassifyStreamResponse(response=reply((2, "2", 1.0)), request_id="4")
    assert core.parse_stream_reply(ok, 4).label == "2"
    with pytest.raises(sdk.ConvserveError, match="out of order"):
        core.parse_stream_reply(ok, 5)
    failed = pb.ClassifyStreamResponse(error_code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                       error_message="images[0]: not an image", request_id="0")
    with pytest.raises(sdk.InvalidInputError, match=r"stream\[0\]: images\[0\]: not an image"):
        core.parse_stream_reply(failed, 0)


def test_default_model_is_the_only_one_else_digits_lenet() -> None:
    one = pb.ListModelsResponse(models=[pb.ModelSummary(name="resnet")])
    two = pb.ListModelsResponse(models=[pb.ModelSummary(name="a"), pb.ModelSummary(name="b")])
    assert core.default_model(one) == "resnet"
    assert core.default_model(two) == "digits_lenet"
    assert core.default_model(pb.ListModelsResponse()) == "digits_lenet"


def test_parse_models_and_description() -> None:
    cpu = "CPUExecutionProvider"
    version = pb.VersionStatus(version=2, state=pb.MODEL_STATE_READY, execution_provider=cpu)
    failed = pb.VersionStatus(version=3, state=pb.MODEL_STATE_FAILED, reason="bad onnx")
    listing = pb.ListModelsResponse(models=[pb.ModelSummary(name="m", versions=[version, failed])])
    [info] = core.parse_models(listing)
    assert info.ready and [v.state for v in info] == ["ready", "failed"]
    assert str(info) == "m: v2 ready on CPUExecutionProvider, v3 failed: bad onnx"
    meta = core.parse_description(pb.ModelDescription(
        name="m", version=2, versions=[version], ready=True, labels=["a", "b"], max_batch_size=64,
        execution_provider="CPUExecutionProvider",
        input=pb.InputSpec(name="input", dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 28, 28], layout="NCHW",
                           color_mode="L", mean=[0.5], std=[0.5]),
        batching=pb.BatchingSpec(enabled=True, max_batch_size=64, preferred_batch_sizes=[8, 16])))
    assert meta.input == sdk.InputSpec("input", "float32", (1, 28, 28), "NCHW", "L", (0.5,), (0.5,))
    assert meta.labels == ("a", "b")
    assert meta.batching is not None and meta.batching.preferred_batch_sizes == (8, 16)
    assert "input float32[1x28x28] NCHW L" in str(meta)
    assert core.parse_description(pb.ModelDescription(name="m")).batching is None


# --- settings ---------------------------------------------------------------------------------------------

def test_target_comes_from_argument_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert core.resolve_target(None) == "127.0.0.1:8001"
    monkeypatch.setenv("CONVSERVE_SERVER", "example:9")
    assert core.resolve_target(None) == "example:9"
    assert core.resolve_target("h:1") == "h:1"


def test_token_becomes_bearer_metadata() -> None:
    assert core.call_metadata(None) is None
    assert core.call_metadata(" s3cret\n") == (("authorization", "Bearer s3cret"),)
    with pytest.raises(ValueError):
        core.call_metadata("  ")


def test_tls_only_when_asked_and_mtls_needs_both_halves() -> None:
    assert core.channel_credentials(None, None, None, None) is None
    assert isinstance(core.channel_credentials(True, None, None, None), grpc.ChannelCredentials)
    with pytest.raises(ValueError, match="both"):
        core.channel_credentials(None, b"ca", b"cert", None)


def test_channel_options_carry_limits_keepalive_and_overrides() -> None:
    options = dict(core.channel_options(1234, 30.0, "localhost", [("grpc.max_send_message_length", 99)]))
    assert options["grpc.max_receive_message_length"] == 1234
    assert options["grpc.max_send_message_length"] == 99
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.ssl_target_name_override"] == "localhost"
    assert "grpc.keepalive_time_ms" not in dict(core.channel_options(1, None, None, ()))


# --- the public surface -----------------------------------------------------------------------------------

def test_all_is_sorted_and_complete() -> None:
    assert sdk.__all__ == sorted(sdk.__all__)
    public = {name for name, value in vars(sdk).items()
              if not name.startswith("_") and not inspect.ismodule(value)}
    assert public == set(sdk.__all__)


def test_results_are_frozen() -> None:
    prediction = sdk.Prediction(1, "1", 0.5)
    with pytest.raises(AttributeError):
        prediction.label = "2"  # type: ignore[misc]


def test_importing_the_sdk_does_not_import_pillow_or_the_server() -> None:
    code = ("import sys, convserve.client; "
            "bad = [m for m in ('PIL', 'onnxruntime', 'convserve.server') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
