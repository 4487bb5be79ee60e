"""Helpers the SDK tests share: deterministic images, the models' preprocessing by hand, result checks."""

from __future__ import annotations

from typing import Any

import numpy as np

# The tiny "gray" model of tests/conftest.py: 1x8x8 grayscale, mean 0.5, std 0.25, 4 classes, latest v2.
GRAY = "gray"
GRAY_SIZE = 8


def digit_pixels(seed: int, size: int = GRAY_SIZE, channels: int | None = None) -> np.ndarray:
    """A deterministic uint8 image, HW (or HWC with ``channels``)."""
    rng = np.random.default_rng(seed)
    shape = (size, size) if channels is None else (size, size, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def preprocess(pixels: np.ndarray, mean: float = 0.5, std: float = 0.25) -> np.ndarray:
    """The gray/rgb models' preprocessing written out by hand (no resize: images are already the input size):
    HW or HWC uint8 → CHW float32, /255, (x - mean) / std."""
    x = pixels.astype(np.float32) / 255.0
    chw = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    return ((chw - mean) / std).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def assert_matches(result: Any, probabilities: np.ndarray, model: str = GRAY, version: int = 2) -> None:
    """A Classification equals the reference: model, version, ranking and probabilities."""
    assert (result.model, result.version) == (model, version)
    order = np.argsort(-probabilities, kind="stable")[:len(result)]
    assert [p.index for p in result] == order.tolist()
    np.testing.assert_allclose([p.probability for p in result], probabilities[order], rtol=1e-5, atol=1e-6)
    assert [p.label for p in result] == [f"class_{i}" for i in order]


