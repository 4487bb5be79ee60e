"""Pure pieces of the request path: preprocessing, postprocessing, provider choice, name/version checks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from convserve.common.model_config import ModelConfig, Preprocessing
from convserve.server.errors import InvalidInputError
from convserve.server.repository.model_repository import parse_version, validate_model_name
from convserve.server.runtime.postprocess import (
    SMALL_OUTPUT_VALUES,
    classify,
    classify_small,
    probabilities,
    resolve_top_k,
    softmax,
    top_k,
)
from convserve.server.runtime.preprocess import ImageLimits, decode_image, stack, tensor_to_array
from convserve.server.runtime.session import provider_list

GRAY = ModelConfig(name="g", labels=tuple("abcd"))
RGB = ModelConfig(
    name="c",
    labels=tuple("abcd"),
    input=GRAY.input.__class__(shape=(3, 28, 28)),
    preprocessing=Preprocessing(color_mode="RGB", resize=(28, 28), mean=(0.5,) * 3, std=(0.5,) * 3),
)


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_softmax_and_top_k_against_direct_formulas() -> None:
    logits = np.random.default_rng(0).normal(size=(6, 10)).astype(np.float32) * 20
    direct = np.exp(logits.astype(np.float64)) / np.exp(logits.astype(np.float64)).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(softmax(logits.copy()), direct, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(
        probabilities(direct.astype(np.float32), "probabilities"), direct.astype(np.float32)
    )
    for k in (1, 3, 10):
        idx, val = top_k(direct, k)
        np.testing.assert_array_equal(idx, np.argsort(-direct, axis=1)[:, :k])
        np.testing.assert_array_equal(val, np.take_along_axis(direct, idx, axis=1))
    idx, _ = top_k(np.array([[0.5, 0.1, 0.5, 0.5]]), 2)
    assert idx.tolist() == [[0, 2]]  # ties: lower index first


def test_small_output_path_matches_numpy_path() -> None:
    """``classify`` takes a pure-Python path for small outputs: same indices (ties included), same dtypes,
    probabilities within float32 rounding of the NumPy path; non-finite rows are left to NumPy."""
    rng = np.random.default_rng(3)
    for trial in range(300):
        rows, classes = int(rng.integers(1, 5)), int(rng.integers(1, 20))
        raw = (rng.normal(size=(rows, classes)) * 10).astype(np.float32)
        if trial % 3 == 0:
            raw = np.round(raw / 10)  # many ties
        for kind in ("logits", "probabilities"):
            for k in {1, min(3, classes), classes}:
                want_i, want_p = top_k(probabilities(raw, kind), k)
                small = classify_small(raw, kind, k)
                assert small is not None
                got_i, got_p = small
                np.testing.assert_array_equal(got_i, want_i)
                np.testing.assert_allclose(got_p, want_p, rtol=1e-6, atol=1e-7)
                assert (got_i.dtype, got_p.dtype, got_p.shape) == (want_i.dtype, want_p.dtype, want_p.shape)
    bad = np.array([[np.nan, 1.0], [0.0, np.inf]], np.float32)
    assert classify_small(bad, "logits", 1) is None
    np.testing.assert_array_equal(classify(bad, "logits", 1)[0], top_k(probabilities(bad, "logits"), 1)[0])
    big = rng.normal(size=(1, SMALL_OUTPUT_VALUES + 1)).astype(np.float32)
    np.testing.assert_array_equal(classify(big, "logits", 5)[0], top_k(probabilities(big, "logits"), 5)[0])


def test_resolve_top_k() -> None:
    assert resolve_top_k(0, 10, 5) == 5 and resolve_top_k(0, 3, 5) == 3 and resolve_top_k(10, 10, 5) == 10
    for bad in (-1, 11):
        with pytest.raises(InvalidInputError, match=f"expected 1..10 .* got {bad}"):
            resolve_top_k(bad, 10, 5)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "I;16", "CMYK", "1"])
def test_decode_any_mode_to_model_input(mode: str) -> None:
    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), "RGB")
    img = (
        base.convert(mode)
        if mode != "I;16"
        else Image.fromarray(rng.integers(0, 65536, (20, 30), dtype=np.uint16))
    )
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    for cfg in (GRAY, RGB):
        arr = decode_image(_encode(img, fmt), cfg, where="images[3]")
        assert arr.shape == cfg.input.shape and arr.dtype == np.float32
        assert arr.min() >= -1.0001 and arr.max() <= 1.0001  # (x/255 - 0.5) / 0.5 stays in [-1, 1]


def test_decode_exact_values_for_sized_gray_png() -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (28, 28), dtype=np.uint8)
    arr = decode_image(_encode(Image.fromarray(pixels, "L")), GRAY)
    np.testing.assert_allclose(arr[0], (pixels / 255.0 - 0.5) / 0.5, rtol=1e-6, atol=1e-6)


def test_decode_limits_and_garbage() -> None:
    png = _encode(Image.new("L", (100, 100)))
    with pytest.raises(
        InvalidInputError, match=r"x: image is 100x100 = 10000 pixels, over the limit of 9999"
    ):
        decode_image(png, GRAY, ImageLimits(max_pixels=9999), "x")
    with pytest.raises(InvalidInputError, match=r"x: encoded image is \d+ bytes, over the limit of 10 bytes"):
        decode_image(png, GRAY, ImageLimits(max_encoded_bytes=10), "x")
    with pytest.raises(InvalidInputError, match="got a PNG image, which this server does not accept"):
        decode_image(png, GRAY, ImageLimits(formats=("JPEG",)), "x")
    with pytest.raises(InvalidInputError, match="corrupt or truncated"):
        decode_image(png[:40], GRAY, where="x")
    with pytest.raises(InvalidInputError, match="got 5 bytes that do not decode as one"):
        decode_image(b"hello", GRAY, where="x")


def test_tensor_to_array_wraps_float32_without_copy() -> None:
    x = np.random.default_rng(3).normal(size=(2, 1, 28, 28)).astype(np.float32)
    data = x.tobytes()
    arr = tensor_to_array(data, "float32", x.shape, GRAY)
    assert not arr.flags.owndata and np.shares_memory(arr, np.frombuffer(data, np.float32))
    np.testing.assert_array_equal(arr, x)
    assert stack([arr]) is arr
    assert stack([arr[0], arr]).shape == (3, 1, 28, 28)
    pixels = np.full((1, 28, 28), 255, np.uint8)
    np.testing.assert_allclose(tensor_to_array(pixels.tobytes(), "uint8", pixels.shape, GRAY), 1.0)


def test_provider_list_falls_back_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    available = ["CPUExecutionProvider"]
    with caplog.at_level("WARNING", logger="convserve.server.runtime.session"):
        assert provider_list(["openvino", "cuda", "cpu"], available) == ["CPUExecutionProvider"]
        assert provider_list(["openvino", "cuda", "cpu"], available) == ["CPUExecutionProvider"]
    assert len([r for r in caplog.records if "openvino, cuda requested but not available" in r.message]) == 1
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert provider_list(["cuda"], both) == both  # cpu is always the floor
    assert provider_list(["cpu", "cuda"], both) == ["CPUExecutionProvider", "CUDAExecutionProvider"]


def test_names_and_versions_never_reach_the_filesystem() -> None:
    assert validate_model_name("digits_lenet") == "digits_lenet"
    for bad in ("../etc", "a/b", "/abs", ".hidden", "x" * 65, "a b", "a\0b"):
        with pytest.raises(InvalidInputError, match="expected a model name matching"):
            validate_model_name(bad)
    assert parse_version("") == 0 and parse_version("12") == 12
    for bad in ("-1", "1.0", "../1", "1e3"):
        with pytest.raises(InvalidInputError, match="expected a positive integer version"):
            parse_version(bad)
