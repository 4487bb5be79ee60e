"""Preprocessing: any image mode decoded to the model's input, exact values, limits, tensors wrapped."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from convserve.common.model_config import ModelConfig, Preprocessing
from convserve.server.errors import InvalidInputError
from convserve.server.runtime.preprocess import ImageLimits, decode_image, stack, tensor_to_array

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
