"""Model outputs → probabilities → top-k (pure functions)."""

from __future__ import annotations

import numpy as np

from .errors import InvalidInputError


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) logits, stable for large values."""
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def probabilities(outputs: np.ndarray, kind: str) -> np.ndarray:
    """(N, K) model outputs → probabilities: softmax for "logits", as-is for "probabilities"."""
    out = np.asarray(outputs, dtype=np.float32)
    return softmax(out.astype(np.float32, copy=True)) if kind == "logits" else out


def resolve_top_k(requested: int, num_classes: int, default: int, where: str = "top_k") -> int:
    """The k to use: 0 means the server default capped at the class count; else 1..num_classes.

    Raises InvalidInputError for a negative k or one larger than the class count.
    """
    if requested == 0:
        return min(default, num_classes)
    if requested < 0 or requested > num_classes:
        raise InvalidInputError(
            f"{where}: expected 1..{num_classes} (the model's class count) or 0 for the default, "
            f"got {requested}"
        )
    return int(requested)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best (indices, scores), best first; ties keep the lower index first."""
    classes = scores.shape[1]
    if k == 1:
        idx = scores.argmax(axis=1)[:, None]  # argmax returns the first maximum: ties keep the lower index
    elif k >= classes or classes <= 256:
        # A full stable sort is cheaper than partition + sort at these sizes.
        idx = np.argsort(-scores, axis=1, kind="stable")
    else:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (N, k) unordered
        part.sort(axis=1)  # lower index first so the stable sort below breaks ties by index
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        idx = np.take_along_axis(part, order, axis=1)
    idx = idx[:, :k]
    # Fancy indexing instead of take_along_axis: same result, several µs less per call on small arrays.
    return idx, scores[np.arange(len(idx))[:, None], idx]
