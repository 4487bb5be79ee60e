"""The warm-up check a model version must pass before it serves: real batches in, [N, classes] finite out.

The graph check in session.py reads declared shapes, which are often symbolic; only running the model
shows that it keeps one output row per input row (a graph that doubles or collapses the batch passes
a batch-1 probe) and that its outputs are finite. A version that fails here is FAILED before it can
replace a ready one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from convserve.common.model_config import ModelConfig

__all__ = ["ModelCheckError", "warm_up", "warm_up_batches"]


class ModelCheckError(ValueError):
    """The model's outputs at warm-up contradict its config (shape) or are not finite."""


def warm_up_batches(cfg: ModelConfig) -> list[np.ndarray]:
    """The warm-up inputs: one image at batch 1, then a batch of up to 3 (never above max_batch_size).

    The images are what preprocessing makes of a mid-gray, a black and a white image, so that the
    model sees values from the range it will serve (including each channel's normalisation).
    """
    c, h, w = cfg.input.shape
    mean = np.asarray(cfg.preprocessing.mean, dtype=np.float32).reshape(c, 1, 1)
    std = np.asarray(cfg.preprocessing.std, dtype=np.float32).reshape(c, 1, 1)
    images = [
        np.broadcast_to((level - mean) / std, (c, h, w)).astype(np.float32) for level in (0.5, 0.0, 1.0)
    ]
    batches = [np.stack(images[:1])]  # (1, C, H, W)
    if cfg.max_batch_size >= 2:
        batches.append(np.stack(images[: min(3, cfg.max_batch_size)]))  # (N, C, H, W), N in 2..3
    return batches


def warm_up(run: Callable[[np.ndarray], np.ndarray], cfg: ModelConfig) -> None:
    """Run ``warm_up_batches(cfg)`` through ``run``; raise ModelCheckError unless each gives [N, classes]
    finite values. Blocking (it runs the model); called once per version while it loads."""
    for batch in warm_up_batches(cfg):
        n = len(batch)
        out = np.asarray(run(batch))
        expected = (n, cfg.num_classes)
        if out.shape != expected:
            raise ModelCheckError(
                f"warm-up at batch {n}: output {cfg.output.name!r} has shape {list(out.shape)}, "
                f"expected {list(expected)} (one row per image, one column per label)"
            )
        if not np.issubdtype(out.dtype, np.floating) and not np.issubdtype(out.dtype, np.integer):
            raise ModelCheckError(f"warm-up at batch {n}: output dtype {out.dtype} is not numeric")
        finite = np.isfinite(out)
        if not finite.all():
            bad = int(out.size - finite.sum())
            raise ModelCheckError(
                f"warm-up at batch {n}: {bad} of {out.size} output values are not finite (NaN or infinity)"
            )
