"""Bad input, tried systematically over both APIs: the exact status, a message naming the problem, and a
good request right after each one still gets the right answer. Odd-but-valid images must succeed and
match the documented preprocessing, computed here independently of the server's code.
"""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc
from convserve.protos.inference import grpc_service_pb2 as v2pb
from convserve.protos.inference import grpc_service_pb2_grpc

SC = grpc.StatusCode
MAX_IMAGES = 1024  # the server's default max_images_per_request
MAX_MESSAGE = 64 * 1024 * 1024  # the server's default max_message_bytes
MAX_IMAGE_BYTES = 8 * 1024 * 1024  # default max_image_bytes
MAX_PIXELS = 16_000_000  # default max_image_pixels


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def normalized(pixels: np.ndarray, mean: float = 0.5, std: float = 0.25) -> np.ndarray:
    """The documented preprocessing for already-sized uint8 pixels: (x/255 - mean) / std."""
    return ((pixels.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


# ---- stubs ----------------------------------------


@pytest.fixture(scope="module")
def channel(server: Any) -> Iterator[grpc.Channel]:
    # The client side must allow big messages both ways so the *server's* limit is what is tested.
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(server.address, options) as ch:
        yield ch


@pytest.fixture(scope="module")
def classifier(channel: grpc.Channel) -> Any:
    return classifier_pb2_grpc.ClassifierStub(channel)


@pytest.fixture(scope="module")
def v2(channel: grpc.Channel) -> Any:
    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


# ---- image makers ----------------------------------------


def encode(img: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gray_png(seed: int = 0, size: int = 8) -> tuple[bytes, np.ndarray]:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    return encode(Image.fromarray(pixels, "L")), pixels


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, scanlines: bytes) -> bytes:
    """A well-formed 8-bit grayscale PNG whose header claims width x height, holding ``scanlines``."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(scanlines, 9))
        + png_chunk(b"IEND", b"")
    )


def lying_header_bomb() -> bytes:
    """100000 x 100000 pixels (10 gigapixels) declared, a few hundred bytes sent."""
    return png_declaring(100_000, 100_000, b"\x00" * 4096)


def real_bomb() -> bytes:
    """A genuine 6000 x 6000 all-black PNG: 36 megapixels from ~35 kB of zlib."""
    width = height = 6000
    return png_declaring(width, height, (b"\x00" * (width + 1)) * height)


def corrupt_png() -> bytes:
    data = bytearray(gray_png(3, 32)[0])
    start = data.index(b"IDAT") + 4
    for i in range(start + 2, start + 40):
        data[i] ^= 0x5A
    return bytes(data)


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def jpeg_of(pixels: np.ndarray, mode: str) -> bytes:
    return encode(Image.fromarray(pixels, mode), "JPEG", quality=95)


# ---- request builders ----------------------------------------


def classify_images(
    *images: pb.Image, model: str = "gray", version: int = 0, top_k: int = 0
) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(model=model, version=version, top_k=top_k, images=list(images))


def enc(data: bytes) -> pb.Image:
    return pb.Image(encoded=data)


def tensor(data: bytes, shape: list[int], dtype: int = pb.DATA_TYPE_FLOAT32) -> pb.Image:
    return pb.Image(tensor=pb.Tensor(dtype=dtype, shape=shape, data=data))


def v2_bytes(*blobs: bytes, model: str = "gray", version: str = "") -> v2pb.ModelInferRequest:
    inp = v2pb.ModelInferRequest.InferInputTensor(name="input", datatype="BYTES", shape=[len(blobs)])
    request = v2pb.ModelInferRequest(model_name=model, model_version=version, inputs=[inp])
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(b)) + b for b in blobs))
    return request


def v2_raw(
    data: bytes, shape: list[int], datatype: str = "FP32", model: str = "gray", version: str = ""
) -> v2pb.ModelInferRequest:
    inp = v2pb.ModelInferRequest.InferInputTensor(name="input", datatype=datatype, shape=shape)
    request = v2pb.ModelInferRequest(model_name=model, model_version=version, inputs=[inp])
    request.raw_input_contents.append(data)
    return request


def v2_classification(k: int) -> v2pb.ModelInferRequest:
    request = v2_raw(np.zeros((1, 1, 8, 8), np.float32).tobytes(), [1, 1, 8, 8])
    out = request.outputs.add(name="logits")
    out.parameters["classification"].int64_param = k
    return request


def v2_classification_text(text: str, request_level: bool = False) -> v2pb.ModelInferRequest:
    request = v2_raw(np.zeros((1, 1, 8, 8), np.float32).tobytes(), [1, 1, 8, 8])
    params = request.parameters if request_level else request.outputs.add(name="logits").parameters
    params["classification"].string_param = text
    return request


def v2_contents_and_raw() -> v2pb.ModelInferRequest:
    request = v2_raw(np.zeros((1, 1, 8, 8), np.float32).tobytes(), [1, 1, 8, 8])
    request.inputs[0].contents.fp32_contents.extend([1.0] * 64)
    return request


def f32(values: Any, shape: tuple[int, ...] = (1, 1, 8, 8)) -> bytes:
    return np.full(shape, values, dtype=np.float32).tobytes() if np.isscalar(values) else values.tobytes()


def nan_tensor() -> bytes:
    x = np.zeros((1, 1, 8, 8), np.float32)
    x[0, 0, 3, 4] = np.nan
    return x.tobytes()


def inf_tensor() -> bytes:
    x = np.zeros((1, 1, 8, 8), np.float32)
    x[0, 0, 7, 7] = -np.inf
    return x.tobytes()


def many_tensors() -> pb.ClassifyRequest:
    one = tensor(f32(0.0, (1, 8, 8)), [1, 8, 8])
    return classify_images(*([one] * (MAX_IMAGES + 1)))


# ---- the table ----------------------------------------

Build = Callable[[], Any]


@dataclass(frozen=True)
class Bad:
    """One bad input: its request over each API (None where the API cannot express it), the status, and
    words the message must contain (lower-cased comparison) for each API."""

    name: str
    classify: Build | None
    v2: Build | None
    code: SC
    words: tuple[str, ...]
    v2_words: tuple[str, ...] | None = None


_PNG = gray_png(0)[0]
_JPEG = jpeg_of(np.random.default_rng(5).integers(0, 256, (32, 32), dtype=np.uint8), "L")

BAD: list[Bad] = [
    Bad(
        "zero-byte image",
        lambda: classify_images(enc(b"")),
        lambda: v2_bytes(b""),
        SC.INVALID_ARGUMENT,
        ("got 0 bytes",),
    ),
    Bad(
        "truncated png",
        lambda: classify_images(enc(truncated(gray_png(1, 64)[0]))),
        lambda: v2_bytes(truncated(gray_png(1, 64)[0])),
        SC.INVALID_ARGUMENT,
        ("truncated",),
    ),
    Bad(
        "truncated jpeg",
        lambda: classify_images(enc(truncated(_JPEG))),
        lambda: v2_bytes(truncated(_JPEG)),
        SC.INVALID_ARGUMENT,
        ("truncated",),
    ),
    Bad(
        "corrupt png",
        lambda: classify_images(enc(corrupt_png())),
        lambda: v2_bytes(corrupt_png()),
        SC.INVALID_ARGUMENT,
        ("corrupt",),
    ),
    Bad(
        "non-image bytes",
        lambda: classify_images(enc(b"%PDF-1.4 this is certainly not an image")),
        lambda: v2_bytes(b"%PDF-1.4 this is certainly not an image"),
        SC.INVALID_ARGUMENT,
        ("expected an image", "png", "jpeg", "do not decode"),
    ),
    Bad(
        "format not allowed (PPM)",
        lambda: classify_images(enc(encode(Image.new("L", (8, 8)), "PPM"))),
        lambda: v2_bytes(encode(Image.new("L", (8, 8)), "PPM")),
        SC.INVALID_ARGUMENT,
        ("expected an image in one of",),
    ),
    Bad(
        "bomb: header declares 10 gigapixels",
        lambda: classify_images(enc(lying_header_bomb())),
        lambda: v2_bytes(lying_header_bomb()),
        SC.INVALID_ARGUMENT,
        ("10000000000 pixels", f"limit of {MAX_PIXELS} pixels"),
    ),
    Bad(
        "bomb: real 36 megapixels from 35 kB",
        lambda: classify_images(enc(real_bomb())),
        lambda: v2_bytes(real_bomb()),
        SC.INVALID_ARGUMENT,
        ("6000x6000", "36000000 pixels", f"limit of {MAX_PIXELS} pixels"),
    ),
    Bad(
        "encoded image over max bytes",
        lambda: classify_images(enc(_PNG + b"\0" * MAX_IMAGE_BYTES)),
        lambda: v2_bytes(_PNG + b"\0" * MAX_IMAGE_BYTES),
        SC.INVALID_ARGUMENT,
        (f"limit of {MAX_IMAGE_BYTES} bytes",),
    ),
    Bad(
        "one bad image among good ones",
        lambda: classify_images(enc(_PNG), enc(_PNG), enc(b"junk")),
        lambda: v2_bytes(_PNG, _PNG, b"junk"),
        SC.INVALID_ARGUMENT,
        ("images[2]",),
        ("[2]",),
    ),
    Bad(
        "tensor dtype unspecified",
        lambda: classify_images(tensor(f32(0.0), [1, 1, 8, 8], pb.DATA_TYPE_UNSPECIFIED)),
        lambda: v2_raw(np.zeros((1, 1, 8, 8), np.int64).tobytes(), [1, 1, 8, 8], "INT64"),
        SC.INVALID_ARGUMENT,
        ("dtype", "data_type_float32"),
        ("datatype", "fp32", "int64"),
    ),
    Bad(
        "tensor dtype out of enum",
        lambda: classify_images(tensor(f32(0.0), [1, 1, 8, 8], 77)),
        lambda: v2_raw(f32(0.0), [1, 1, 8, 8], "fp32"),
        SC.INVALID_ARGUMENT,
        ("dtype", "77"),
        ("datatype",),
    ),
    Bad(
        "tensor wrong shape",
        lambda: classify_images(tensor(f32(0.0, (1, 1, 9, 8)), [1, 1, 9, 8])),
        lambda: v2_raw(f32(0.0, (1, 1, 9, 8)), [1, 1, 9, 8]),
        SC.INVALID_ARGUMENT,
        ("expected shape", "[1, 1, 9, 8]"),
        ("[1, 1, 9, 8]",),
    ),
    Bad(
        "tensor wrong rank",
        lambda: classify_images(tensor(f32(0.0, (64,)), [64])),
        lambda: v2_raw(f32(0.0, (64,)), [64]),
        SC.INVALID_ARGUMENT,
        ("[64]",),
    ),
    Bad(
        "tensor negative dims",
        lambda: classify_images(tensor(b"", [-1, 1, 8, 8])),
        lambda: v2_raw(b"", [-1, 1, 8, 8]),
        SC.INVALID_ARGUMENT,
        ("-1",),
    ),
    Bad(
        "tensor byte length short",
        lambda: classify_images(tensor(f32(0.0)[:-1], [1, 1, 8, 8])),
        lambda: v2_raw(f32(0.0)[:-1], [1, 1, 8, 8]),
        SC.INVALID_ARGUMENT,
        ("needs 256 bytes", "got 255"),
    ),
    Bad(
        "tensor byte length long",
        lambda: classify_images(tensor(f32(0.0) + b"\0" * 4, [1, 1, 8, 8])),
        lambda: v2_raw(f32(0.0) + b"\0" * 4, [1, 1, 8, 8]),
        SC.INVALID_ARGUMENT,
        ("needs 256 bytes", "got 260"),
    ),
    Bad(
        "tensor NaN",
        lambda: classify_images(tensor(nan_tensor(), [1, 1, 8, 8])),
        lambda: v2_raw(nan_tensor(), [1, 1, 8, 8]),
        SC.INVALID_ARGUMENT,
        ("nan",),
    ),
    Bad(
        "tensor Inf",
        lambda: classify_images(tensor(inf_tensor(), [1, 1, 8, 8])),
        lambda: v2_raw(inf_tensor(), [1, 1, 8, 8]),
        SC.INVALID_ARGUMENT,
        ("inf",),
    ),
    Bad(
        "unknown model",
        lambda: classify_images(enc(_PNG), model="no_such_model"),
        lambda: v2_bytes(_PNG, model="no_such_model"),
        SC.NOT_FOUND,
        ("no model named 'no_such_model'",),
    ),
    Bad(
        "unknown version",
        lambda: classify_images(enc(_PNG), version=7),
        lambda: v2_bytes(_PNG, version="7"),
        SC.NOT_FOUND,
        ("no version 7",),
    ),
    Bad(
        "negative version",
        lambda: classify_images(enc(_PNG), version=-1),
        lambda: v2_bytes(_PNG, version="-1"),
        SC.INVALID_ARGUMENT,
        ("version", "-1"),
    ),
    Bad(
        "model path traversal",
        lambda: classify_images(enc(_PNG), model="../gray"),
        lambda: v2_bytes(_PNG, model="../gray"),
        SC.INVALID_ARGUMENT,
        ("model name", "'../gray'"),
    ),
    Bad(
        "model absolute path",
        lambda: classify_images(enc(_PNG), model="/etc/passwd"),
        lambda: v2_bytes(_PNG, model="/etc/passwd"),
        SC.INVALID_ARGUMENT,
        ("model name", "'/etc/passwd'"),
    ),
    Bad(
        "version path traversal (v2 string)",
        None,
        lambda: v2_bytes(_PNG, version="../1"),
        SC.INVALID_ARGUMENT,
        ("version", "'../1'"),
    ),
    Bad(
        "model not ready (failed to load)",
        lambda: classify_images(enc(_PNG), model="mismatch"),
        lambda: v2_bytes(_PNG, model="mismatch"),
        SC.UNAVAILABLE,
        ("'mismatch'", "no ready version"),
    ),
    Bad(
        "top_k negative",
        lambda: classify_images(enc(_PNG), top_k=-1),
        lambda: v2_classification(-1),
        SC.INVALID_ARGUMENT,
        ("top_k", "expected 1..4", "got -1"),
        ("classification", "expected 1..4", "got -1"),
    ),
    Bad(
        "top_k above class count",
        lambda: classify_images(enc(_PNG), top_k=5),
        lambda: v2_classification(5),
        SC.INVALID_ARGUMENT,
        ("top_k", "expected 1..4", "got 5"),
        ("classification", "expected 1..4", "got 5"),
    ),
    Bad(
        "classification as a superscript digit",
        None,
        lambda: v2_classification_text("\u00b2"),
        SC.INVALID_ARGUMENT,
        ("classification", "expected an integer class count", "\u00b2"),
    ),
    Bad(
        "classification as a 5000-digit number",
        None,
        lambda: v2_classification_text("7" * 5000, request_level=True),
        SC.INVALID_ARGUMENT,
        ("parameters['classification']", "at most 18", "777..."),
    ),
    Bad(
        "contents and raw_input_contents for one input",
        None,
        v2_contents_and_raw,
        SC.INVALID_ARGUMENT,
        ("contents", "raw_input_contents", "got both"),
    ),
    Bad(
        "empty request",
        lambda: pb.ClassifyRequest(),
        lambda: v2pb.ModelInferRequest(),
        SC.INVALID_ARGUMENT,
        ("model", "empty"),
    ),
    Bad(
        "no images",
        lambda: classify_images(),
        lambda: v2pb.ModelInferRequest(model_name="gray"),
        SC.INVALID_ARGUMENT,
        ("at least one image",),
        ("exactly one input", "got 0"),
    ),
    Bad(
        "empty image message",
        lambda: classify_images(pb.Image()),
        lambda: v2_bytes(),
        SC.INVALID_ARGUMENT,
        ("images[0]", "empty image"),
        ("at least one encoded image",),
    ),
    Bad(
        "images over the per-request limit",
        many_tensors,
        lambda: v2_raw(f32(0.0, (MAX_IMAGES + 1, 1, 8, 8)), [MAX_IMAGES + 1, 1, 8, 8]),
        SC.RESOURCE_EXHAUSTED,
        (f"{MAX_IMAGES + 1} images", f"limit of {MAX_IMAGES}"),
    ),
    Bad(
        "message over max size",
        lambda: classify_images(enc(b"\0" * (MAX_MESSAGE + 1024))),
        lambda: v2_raw(b"\0" * (MAX_MESSAGE + 1024), [1, 1, 8, 8]),
        SC.RESOURCE_EXHAUSTED,
        ("larger than max",),
    ),
]


def _call(stub_method: Any, request: Any) -> tuple[SC, str]:
    try:
        stub_method(request, timeout=30)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return SC.OK, ""


def assert_still_serving(classifier: Any, v2: Any, model_repository: Path, run_reference: Any) -> None:
    """A good request right after a bad one gets the right answer, over both APIs."""
    png, pixels = gray_png(42)
    expected = run_reference(model_repository / "gray" / "2" / "model.onnx", normalized(pixels)[None, None])
    reply = classifier.Classify(classify_images(enc(png), top_k=4), timeout=10)
    probs = softmax(expected)[0]
    assert [p.index for p in reply.results[0].predictions] == np.argsort(-probs, kind="stable").tolist()
    np.testing.assert_allclose(
        [p.probability for p in reply.results[0].predictions], np.sort(probs)[::-1], rtol=1e-4, atol=1e-6
    )
    got = np.frombuffer(v2.ModelInfer(v2_bytes(png), timeout=10).raw_output_contents[0], "<f4").reshape(1, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


# Every (case, API) pair the API can express.
PAIRS = [(case, api) for case in BAD for api in ("classify", "v2") if getattr(case, api) is not None]


@pytest.mark.parametrize(("case", "api"), PAIRS, ids=[f"{case.name}-{api}" for case, api in PAIRS])
def test_bad_input(
    case: Bad, api: str, classifier: Any, v2: Any, model_repository: Path, run_reference: Any
) -> None:
    build = case.classify if api == "classify" else case.v2
    assert build is not None
    method = classifier.Classify if api == "classify" else v2.ModelInfer
    code, details = _call(method, build())
    assert code == case.code, f"{case.name}: {code} {details!r}"
    words = case.words if api == "classify" or case.v2_words is None else case.v2_words
    for word in words:
        assert word.lower() in details.lower(), f"{case.name}: {word!r} not in {details!r}"
    assert_still_serving(classifier, v2, model_repository, run_reference)


def test_bad_input_inside_streams(
    classifier: Any, v2: Any, model_repository: Path, run_reference: Any
) -> None:
    """On the streams a bad message gets its error in place and the stream goes on with the next one."""
    good_png, pixels = gray_png(7)
    requests = [classify_images(enc(good_png), top_k=4)]
    for case in BAD:
        if case.classify is not None and case.code != SC.RESOURCE_EXHAUSTED:  # over-size ends a stream
            requests += [case.classify(), classify_images(enc(good_png), top_k=4)]
    replies = list(classifier.ClassifyStream(iter(requests), timeout=60))
    assert len(replies) == len(requests)
    probs = softmax(
        run_reference(model_repository / "gray" / "2" / "model.onnx", normalized(pixels)[None, None])
    )[0]
    for i, reply in enumerate(replies):
        if i % 2 == 0:
            assert reply.error_code == 0, reply.error_message
            assert [p.index for p in reply.response.results[0].predictions] == np.argsort(-probs).tolist()
        else:
            assert reply.error_code not in (0, SC.UNKNOWN.value[0], SC.INTERNAL.value[0]), reply.error_message
    v2_requests = [v2_bytes(good_png)]
    for case in BAD:
        if case.v2 is not None and case.code != SC.RESOURCE_EXHAUSTED:
            v2_requests += [case.v2(), v2_bytes(good_png)]
    v2_replies = list(v2.ModelStreamInfer(iter(v2_requests), timeout=60))
    assert len(v2_replies) == len(v2_requests)
    assert all(not r.error_message for r in v2_replies[::2])
    assert all(
        r.error_message and not r.error_message.startswith(("UNKNOWN", "INTERNAL")) for r in v2_replies[1::2]
    )
    assert_still_serving(classifier, v2, model_repository, run_reference)


# ---- odd but valid images: must succeed and match the documented preprocessing ----


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma with Pillow's fixed-point rounding: L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


@dataclass(frozen=True)
class Good:
    name: str
    model: str
    make: Callable[[], tuple[bytes, np.ndarray]]  # (encoded bytes, expected uint8 pixels (C, H, W))


def _palette() -> tuple[bytes, np.ndarray]:
    idx = np.random.default_rng(11).integers(0, 16, (8, 8), dtype=np.uint8)
    grays = np.arange(16, dtype=np.uint8) * 17
    img = Image.fromarray(idx, "P")
    img.putpalette(np.repeat(grays, 3).tolist())
    return encode(img), grays[idx][None]


def _palette_transparent() -> tuple[bytes, np.ndarray]:
    idx = np.random.default_rng(12).integers(0, 16, (8, 8), dtype=np.uint8)
    grays = np.arange(16, dtype=np.uint8) * 17
    img = Image.fromarray(idx, "P")
    img.putpalette(np.repeat(grays, 3).tolist())
    data = encode(img, transparency=5)  # palette index 5 is fully transparent: composited onto black
    return data, np.where(idx == 5, 0, grays[idx]).astype(np.uint8)[None]


def _gray_alpha() -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(13)
    g = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    a = np.where(rng.random((8, 8)) < 0.3, 0, 255).astype(np.uint8)
    return encode(Image.fromarray(np.stack([g, a], -1), "LA")), np.where(a == 0, 0, g).astype(np.uint8)[None]


def _rgba() -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(14)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    a = np.where(rng.random((16, 16)) < 0.3, 0, 255).astype(np.uint8)
    img = Image.fromarray(np.concatenate([rgb, a[..., None]], -1), "RGBA")
    return encode(img), np.where(a[..., None] == 0, 0, rgb).astype(np.uint8).transpose(2, 0, 1)


def _sixteen_bit() -> tuple[bytes, np.ndarray]:
    g = np.random.default_rng(15).integers(0, 256, (8, 8)).astype(np.uint16)
    # Scaled to 8 bits as v * 255 / 65535; +128 keeps each value safely inside its 8-bit bucket.
    return encode(Image.fromarray(g * 257 + 128)), g.astype(np.uint8)[None]


def _cmyk_jpeg() -> tuple[bytes, np.ndarray]:
    cmyk = np.random.default_rng(16).integers(0, 256, (16, 16, 4), dtype=np.uint8)
    data = encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95)
    # JPEG is lossy: the reference decodes the same bytes, then converts CMYK → RGB by hand with Pillow's
    # (colour-management-free) formula R = (255 - K) - (C * (255 - K)) / 255, in its rounded integer form.
    decoded = np.asarray(Image.open(io.BytesIO(data)), dtype=np.int64)
    if Image.open(io.BytesIO(data)).mode != "CMYK":
        raise AssertionError("test image did not round-trip as CMYK")
    nk = 255 - decoded[..., 3:4]
    t = decoded[..., :3] * nk + 128
    rgb = np.clip(nk - (((t >> 8) + t) >> 8), 0, 255)
    return data, rgb.astype(np.uint8).transpose(2, 0, 1)


def _gray_into_rgb() -> tuple[bytes, np.ndarray]:
    g = np.random.default_rng(17).integers(0, 256, (16, 16), dtype=np.uint8)
    return encode(Image.fromarray(g, "L")), np.repeat(g[None], 3, axis=0)


def _rgb_into_gray() -> tuple[bytes, np.ndarray]:
    rgb = np.random.default_rng(18).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return encode(Image.fromarray(rgb, "RGB")), luma(rgb)[None]


def _one_by_one() -> tuple[bytes, np.ndarray]:
    return encode(Image.new("L", (1, 1), 77)), np.full((1, 8, 8), 77, np.uint8)


def _very_large() -> tuple[bytes, np.ndarray]:
    # 3000 x 3000 = 9 megapixels: under the 16 M default, decoded in a worker thread, resized to 8 x 8.
    return encode(Image.new("L", (3000, 3000), 201)), np.full((1, 8, 8), 201, np.uint8)


def _grayscale_jpeg() -> tuple[bytes, np.ndarray]:
    data = jpeg_of(np.random.default_rng(19).integers(0, 256, (8, 8), dtype=np.uint8), "L")
    return data, np.asarray(Image.open(io.BytesIO(data)), dtype=np.uint8)[None]


GOOD = [
    Good("palette", "gray", _palette),
    Good("palette with transparency", "gray", _palette_transparent),
    Good("gray + alpha", "gray", _gray_alpha),
    Good("RGBA", "rgb", _rgba),
    Good("16-bit grayscale PNG", "gray", _sixteen_bit),
    Good("CMYK JPEG", "rgb", _cmyk_jpeg),
    Good("grayscale into an RGB model", "rgb", _gray_into_rgb),
    Good("RGB into a grayscale model", "gray", _rgb_into_gray),
    Good("1x1 image", "gray", _one_by_one),
    Good("very large image (9 MP)", "gray", _very_large),
    Good("grayscale JPEG", "gray", _grayscale_jpeg),
]


@pytest.mark.parametrize("case", GOOD, ids=[c.name for c in GOOD])
def test_odd_images_succeed_with_documented_preprocessing(
    case: Good, classifier: Any, v2: Any, model_repository: Path, run_reference: Any
) -> None:
    data, pixels = case.make()
    version = "2" if case.model == "gray" else "1"
    classes = 4 if case.model == "gray" else 10
    x = normalized(pixels)[None]
    expected = run_reference(model_repository / case.model / version / "model.onnx", x)
    reply = classifier.Classify(classify_images(enc(data), model=case.model, top_k=classes), timeout=30)
    probs = softmax(expected)[0]
    got = np.zeros(classes, np.float32)
    for p in reply.results[0].predictions:
        got[p.index] = p.probability
    np.testing.assert_allclose(got, probs, rtol=1e-4, atol=1e-5)
    logits = np.frombuffer(
        v2.ModelInfer(v2_bytes(data, model=case.model), timeout=30).raw_output_contents[0], "<f4"
    )
    np.testing.assert_allclose(logits.reshape(1, classes), expected, rtol=1e-4, atol=1e-5)


def test_top_k_zero_means_the_default(
    classifier: Any, v2: Any, model_repository: Path, run_reference: Any
) -> None:
    """0 is proto3's "not set": the server default (5) capped at the class count (4 for gray)."""
    reply = classifier.Classify(classify_images(enc(_PNG), top_k=0), timeout=10)
    assert len(reply.results[0].predictions) == 4
    reply = classifier.Classify(classify_images(enc(_PNG), model="rgb", top_k=0), timeout=10)
    assert len(reply.results[0].predictions) == 5
    assert_still_serving(classifier, v2, model_repository, run_reference)


# ---- slow clients ----------------------------------------


def test_slow_clients_do_not_stall_others(
    server: Any, classifier: Any, v2: Any, model_repository: Path, run_reference: Any
) -> None:
    """A stream held open without sending, a stream whose replies are never read, and idle raw TCP
    connections (half an HTTP/2 preface) do not stop the server answering everyone else promptly."""
    release = threading.Event()
    png = gray_png(8)[0]

    def trickle() -> Iterator[pb.ClassifyRequest]:
        yield classify_images(enc(png), top_k=1)
        release.wait(20)  # hold the stream open, sending nothing

    held = classifier.ClassifyStream(trickle(), timeout=30)
    first = next(held)
    assert first.error_code == 0

    # A second stream that pushes 200 requests and never reads a reply until the end.
    unread = classifier.ClassifyStream(iter([classify_images(enc(png), top_k=1)] * 200), timeout=30)
    v2_held = v2.ModelStreamInfer(iter([v2_bytes(png)] * 50), timeout=30)

    sockets = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", server.grpc_port), timeout=5)
        s.sendall(b"PRI * HTTP/2.0\r\n")  # half of the client preface, then silence
        sockets.append(s)
    try:
        latencies = []
        for _ in range(30):
            t0 = time.perf_counter()
            assert_still_serving(classifier, v2, model_repository, run_reference)
            latencies.append(time.perf_counter() - t0)
        # Generous for a busy 2-core CI machine; a stalled server would hit the 10 s call deadline.
        assert max(latencies) < 2.0, latencies
    finally:
        for s in sockets:
            s.close()
        release.set()
    assert sum(1 for _ in held) == 0  # the held stream ends cleanly once its client finishes sending
    assert sum(1 for r in unread if r.error_code == 0) == 200
    assert sum(1 for r in v2_held if not r.error_message) == 50
