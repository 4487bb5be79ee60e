"""The v2 protocol's tensor forms shared by its gRPC and REST front ends: BYTES elements and classification.

A BYTES tensor travels as its elements back to back, each a 4-byte little-endian length then its bytes
(gRPC ``raw_input_contents``/``raw_output_contents``, REST binary data). The classification extension
answers a BYTES ``[N, k]`` tensor of ``"score:index:label"`` strings, best first.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from ..errors import InvalidInputError

__all__ = ["classification_strings", "deserialize_bytes", "serialize_bytes"]


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    """BYTES tensor wire form: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def deserialize_bytes(raw: bytes | memoryview, where: str) -> list[bytes]:
    """The elements of a BYTES tensor's wire form; InvalidInputError naming ``where`` if it is cut short."""
    items: list[bytes] = []
    view = memoryview(raw)
    pos = 0
    while pos < len(view):
        if pos + 4 > len(view):
            raise InvalidInputError(
                f"{where}: BYTES raw contents end inside a 4-byte length prefix at offset {pos}"
            )
        (size,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + size > len(view):
            raise InvalidInputError(
                f"{where}: BYTES element at offset {pos - 4} claims {size} bytes, "
                f"only {len(view) - pos} remain"
            )
        items.append(bytes(view[pos : pos + size]))
        pos += size
    return items


def classification_strings(indices: np.ndarray, scores: np.ndarray, labels: Sequence[str]) -> list[str]:
    """(N, k) top-k indices and scores → N*k ``"score:index:label"`` strings, row-major, best first."""
    return [
        f"{p:f}:{i}:{labels[i]}"
        for row_i, row_p in zip(indices.tolist(), scores.tolist(), strict=False)
        for i, p in zip(row_i, row_p, strict=False)
    ]
