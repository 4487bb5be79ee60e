"""The external-data references of an ONNX graph, read from its protobuf bytes without the ``onnx`` package.

A graph over 2 GB (and torch's default export) keeps its weights in files beside ``model.onnx``; each
initializer names its file in ``external_data`` (``location``, ``offset``, ``length``). ONNX Runtime opens
those files itself, from C++, so the server must read the names first to keep every read inside the
model's version folder (model_files.py). Only the wire format and the field numbers of onnx.proto
are used here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["ExternalTensor", "GraphFormatError", "external_tensors"]


class GraphFormatError(ValueError):
    """The bytes are not a well-formed ONNX protobuf message."""


@dataclass(frozen=True)
class ExternalTensor:
    """One tensor whose bytes live in another file: ``location`` relative to the graph's folder."""

    name: str
    location: str
    offset: int
    length: int | None  # None: to the end of the file
    nbytes: int | None  # what the dims and data type need, None when the type has no fixed size


# onnx.proto field numbers of the messages that can hold tensors.
_MODEL_GRAPH, _MODEL_TRAINING, _MODEL_FUNCTIONS = 7, 20, 25
_TRAINING_GRAPHS = (1, 2)  # initialization, algorithm
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE = 1, 5, 15
_FUNCTION_NODE = 7
_NODE_ATTRIBUTE = 5
_ATTR_TENSOR, _ATTR_GRAPH, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_DIMS, _TENSOR_TYPE, _TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 1, 2, 8, 13, 14
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
# TensorProto.DataType → bytes per element, for the fixed-size types.
_ITEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}
_MAX_DEPTH = 64  # nested subgraphs (If/Loop bodies); a deeper message is refused, not recursed into


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise GraphFormatError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field: an int for varints, the bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise GraphFormatError("a length-delimited field runs past the end of its message")
            yield number, wire, buf[pos : pos + size]
            pos += size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > len(buf):
                raise GraphFormatError("a fixed-width field runs past the end of its message")
            yield number, wire, buf[pos : pos + width]
            pos += width
        else:
            raise GraphFormatError(f"unsupported protobuf wire type {wire}")


def _messages(buf: memoryview, number: int) -> Iterator[memoryview]:
    for n, wire, value in _fields(buf):
        if n == number and wire == 2 and not isinstance(value, int):
            yield value


def _tensor(buf: memoryview) -> ExternalTensor | None:
    name, location, dtype = "", 0, 0
    entries: dict[str, str] = {}
    dims: list[int] = []
    for n, wire, value in _fields(buf):
        if isinstance(value, int):  # a varint (wire type 0)
            if n == _TENSOR_LOCATION:
                location = value
            elif n == _TENSOR_TYPE:
                dtype = value
            elif n == _TENSOR_DIMS:
                dims.append(value)
        elif n == _TENSOR_NAME and wire == 2:
            name = bytes(value).decode("utf-8", "replace")
        elif n == _TENSOR_DIMS and wire == 2:  # packed
            pos, packed = 0, value
            while pos < len(packed):
                dim, pos = _varint(packed, pos)
                dims.append(dim)
        elif n == _TENSOR_EXTERNAL and wire == 2:
            key = val = ""
            for k, kwire, text in _fields(value):
                if kwire == 2 and k in (1, 2) and not isinstance(text, int):
                    decoded = bytes(text).decode("utf-8", "replace")
                    key, val = (decoded, val) if k == 1 else (key, decoded)
            entries[key] = val
    if location != _EXTERNAL:
        return None
    where = f"tensor {name!r}"
    if not entries.get("location"):
        raise GraphFormatError(f"{where} is stored externally but names no location")
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError:
        raise GraphFormatError(f"{where}: external offset/length are not integers") from None
    if offset < 0 or (length is not None and length < 0):
        raise GraphFormatError(f"{where}: negative external offset or length")
    count = 1
    for dim in dims:
        count *= dim if dim < 1 << 63 else 0  # a negative int64 reads as a huge varint: no fixed size
    item = _ITEM_BYTES.get(dtype)
    return ExternalTensor(name, entries["location"], offset, length, count * item if item else None)


def _graph(buf: memoryview, depth: int) -> Iterator[ExternalTensor]:
    if depth > _MAX_DEPTH:
        raise GraphFormatError(f"subgraphs nested deeper than {_MAX_DEPTH}")
    for n, wire, value in _fields(buf):
        if wire != 2:
            continue
        assert isinstance(value, memoryview)
        if n == _GRAPH_INITIALIZER:
            yield from _some(_tensor(value))
        elif n == _GRAPH_SPARSE:
            yield from _sparse(value)
        elif n == _GRAPH_NODE:
            yield from _node(value, depth)


def _node(buf: memoryview, depth: int) -> Iterator[ExternalTensor]:
    for attr in _messages(buf, _NODE_ATTRIBUTE):
        for n, wire, value in _fields(attr):
            if wire != 2:
                continue
            assert isinstance(value, memoryview)
            if n in (_ATTR_TENSOR, _ATTR_TENSORS):
                yield from _some(_tensor(value))
            elif n in (_ATTR_SPARSE, _ATTR_SPARSES):
                yield from _sparse(value)
            elif n in (_ATTR_GRAPH, _ATTR_GRAPHS):
                yield from _graph(value, depth + 1)


def _sparse(buf: memoryview) -> Iterator[ExternalTensor]:
    for number in (_SPARSE_VALUES, _SPARSE_INDICES):
        for tensor in _messages(buf, number):
            yield from _some(_tensor(tensor))


def _some(tensor: ExternalTensor | None) -> Iterator[ExternalTensor]:
    if tensor is not None:
        yield tensor


def external_tensors(model: bytes) -> list[ExternalTensor]:
    """Every tensor of a serialized ModelProto stored in an external file: initializers, sparse
    initializers, constant attributes, subgraphs, functions and training graphs. Raises GraphFormatError."""
    buf = memoryview(model)
    found: list[ExternalTensor] = []
    for n, wire, value in _fields(buf):
        if wire != 2:
            continue
        assert isinstance(value, memoryview)
        if n == _MODEL_GRAPH:
            found.extend(_graph(value, 0))
        elif n == _MODEL_FUNCTIONS:
            for node in _messages(value, _FUNCTION_NODE):
                found.extend(_node(node, 0))
        elif n == _MODEL_TRAINING:
            for number in _TRAINING_GRAPHS:
                for graph in _messages(value, number):
                    found.extend(_graph(graph, 0))
    return found
