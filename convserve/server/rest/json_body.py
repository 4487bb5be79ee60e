"""Strict, bounded JSON for REST bodies: what may be parsed at all, and JSON tensor data checked by type.

Parsing holds the GIL from the first byte to the last (a C parser included), so a parse in a worker
thread still stalls the event loop and every health probe; the only remedy is to bound what is parsed.
Before parsing, C-speed byte counts bound the JSON's size, its arrays (``[``) and its elements (``,``):
what passes parses in milliseconds with orjson (strict RFC 8259: no NaN or Infinity, valid UTF-8 only).
Big tensors belong in the binary tensor extension, which is never parsed as JSON; the refusal says so.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import orjson

from ..errors import InvalidInputError, RequestTooLargeError

__all__ = [
    "MAX_JSON_ARRAYS",
    "MAX_JSON_BYTES",
    "MAX_JSON_ELEMENTS",
    "check_size",
    "loads",
    "tensor_elements",
]

# Bounds on a JSON request (the header, when binary data follows). Where they come from: a ResNet
# 3x224x224 image is 150 k numbers (~1.6 MB as JSON, 676 arrays nested); a batch of 64 LeNet images is
# 50 k numbers. At these bounds orjson parses a body in a few ms and an element check costs about as much.
MAX_JSON_BYTES = 4 * 1024 * 1024
MAX_JSON_ELEMENTS = 1024 * 1024
MAX_JSON_ARRAYS = 64 * 1024
_BINARY_HINT = (
    "send big tensors as binary data (the binary tensor extension: an input's "
    "parameters.binary_data_size and the Inference-Header-Content-Length header)"
)

# JSON leaf types each v2 datatype accepts (bool is not an int here, whatever Python says).
_INTEGERS = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
_FLOATS = ("FP16", "BF16", "FP32", "FP64")
LEAF_TYPES: dict[str, frozenset[type]] = {
    "BOOL": frozenset((bool,)),
    "BYTES": frozenset((str,)),
    **dict.fromkeys(_INTEGERS, frozenset((int,))),
    **dict.fromkeys(_FLOATS, frozenset((int, float))),
}
_WANTED = {"BOOL": "booleans", "BYTES": "strings", **dict.fromkeys(_INTEGERS, "integers"),
           **dict.fromkeys(_FLOATS, "numbers")}  # fmt: skip
_TYPE_NAMES = {bool: "boolean", str: "string", int: "integer", float: "non-integer number",
               type(None): "null", dict: "object", list: "array"}  # fmt: skip


def check_size(size: int, where: str) -> None:
    """RequestTooLargeError, naming the binary tensor extension, for JSON over ``MAX_JSON_BYTES``."""
    if size > MAX_JSON_BYTES:
        raise RequestTooLargeError(
            f"{where}: {size} bytes of JSON, over the {MAX_JSON_BYTES} a JSON request may have; "
            f"{_BINARY_HINT}"
        )


def loads(data: bytes | memoryview, where: str = "request body", expected: str = "JSON") -> Any:
    """Parse ``data`` as strict JSON within the bounds above.

    Raises RequestTooLargeError (naming the binary tensor extension) past a bound, InvalidInputError when
    the text is not JSON.
    """
    check_size(len(data), where)
    raw = bytes(data) if isinstance(data, memoryview) else data
    # Upper bounds counted in C (strings may hold these bytes too): parsing cost follows them.
    arrays = raw.count(b"[")
    if arrays > MAX_JSON_ARRAYS:
        raise RequestTooLargeError(
            f"{where}: up to {arrays} JSON arrays ('[' characters), over the {MAX_JSON_ARRAYS} a request "
            f"may have; send tensor data flat (row-major) or {_BINARY_HINT}"
        )
    elements = raw.count(b",") + 1
    if elements > MAX_JSON_ELEMENTS:
        raise RequestTooLargeError(
            f"{where}: up to {elements} JSON values (',' separated), over the {MAX_JSON_ELEMENTS} a request "
            f"may have; {_BINARY_HINT}"
        )
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        named = b"NaN" in raw or b"Infinity" in raw
        hint = "; JSON numbers are finite: NaN and Infinity are not JSON" if named else ""
        raise InvalidInputError(
            f"{where}: expected {expected}, got text that does not parse ({exc}){hint}"
        ) from None


def tensor_elements(data: list[Any], datatype: str, where: str) -> list[Any]:
    """The leaves of a JSON ``data`` array (flat or nested, row-major), each of the type ``datatype``
    takes (numbers for FP32, booleans for BOOL, strings for BYTES, ...); InvalidInputError otherwise.

    Flattened a level at a time in C (``chain``), so a nested tensor costs about what a flat one does.
    """
    level = data
    kinds = set(map(type, level))
    while kinds == {list}:
        level = list(chain.from_iterable(level))
        kinds = set(map(type, level))
    if list in kinds:
        raise InvalidInputError(
            f"{where}.data: expected an array nested evenly to the shape, got arrays mixed with values"
        )
    allowed = LEAF_TYPES.get(datatype)
    if allowed is not None and not kinds <= allowed:
        got = ", ".join(sorted(_TYPE_NAMES.get(t, t.__name__) + "s" for t in kinds - allowed))
        raise InvalidInputError(f"{where}.data: expected {_WANTED[datatype]} for {datatype}, got {got}")
    return level
