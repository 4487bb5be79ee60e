"""Model outputs → probabilities → top-k (pure functions)."""

from __future__ import annotations

import math

import numpy as np

from ..errors import InvalidInputError

# Outputs of at most this many values (rows × classes) take ``classify_small``'s pure-Python path: a dozen
# NumPy calls on a (1, 10) array cost ~15-50 µs of per-call overhead, more than LeNet's whole run.
SMALL_OUTPUT_VALUES = 256


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


def classify(outputs: np.ndarray, kind: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) model outputs → per row the k most probable (indices, probabilities), best first.

    Same result as ``top_k(probabilities(outputs, kind), k)``; small outputs skip NumPy's per-call cost.
    """
    if outputs.size <= SMALL_OUTPUT_VALUES and outputs.ndim == 2:
        small = classify_small(outputs, kind, k)
        if small is not None:
            return small
    return top_k(probabilities(outputs, kind), k)


def classify_small(outputs: np.ndarray, kind: str, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``classify`` in pure Python for a few values; None when a row is not finite (NumPy decides then).

    The order comes from the raw outputs (softmax is monotonic), so equal outputs keep the lower index
    first, as in ``top_k``; probabilities are computed in float64 and rounded to float32.
    """
    indices: list[list[int]] = []
    scores: list[list[float]] = []
    logits = kind == "logits"
    for row in np.asarray(outputs, dtype=np.float32).tolist():
        best = max(row)
        if not math.isfinite(best):
            return None
        if k == 1:
            order = [row.index(best)]
        else:
            order = sorted(range(len(row)), key=row.__getitem__, reverse=True)[:k]  # stable: ties by index
            # reverse=True keeps equal keys in their original order, so ties stay lower index first.
        if logits:
            total = math.fsum(math.exp(v - best) for v in row)
            if not math.isfinite(total) or total <= 0.0:
                return None
            scores.append([math.exp(row[i] - best) / total for i in order])
        else:
            scores.append([row[i] for i in order])
        indices.append(order)
    return np.array(indices, dtype=np.intp), np.array(scores, dtype=np.float32)
