"""Postprocessing: softmax, top-k and the small-output path against direct formulas."""

from __future__ import annotations

import numpy as np
import pytest

from convserve.server.errors import InvalidInputError
from convserve.server.runtime.postprocess import (
    SMALL_OUTPUT_VALUES,
    classify,
    classify_small,
    probabilities,
    resolve_top_k,
    softmax,
    top_k,
)


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
