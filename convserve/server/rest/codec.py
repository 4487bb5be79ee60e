"""v2 REST inference bodies ↔ domain objects: JSON tensors, the binary-tensor extension, classification.

A request body is a JSON header, optionally followed by binary tensor data: the header's length then
arrives in ``Inference-Header-Content-Length`` and each input holding ``parameters.binary_data_size``
takes that many bytes of the rest, in input order. Outputs come back as JSON ``data`` or, when asked
(``parameters.binary_data`` on an output, or ``binary_data_output`` on the request), as binary data
after the JSON header, announced the same way. Pure functions: the REST routes run them inline for
small bodies and on the core's CPU pool for big ones.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from convserve.common.model_config import ModelConfig

from ..core.inference import EncodedImage, InferenceResult, Input, RequestedOutput, TensorInput
from ..core.v2_tensors import classification_strings, deserialize_bytes, serialize_bytes
from ..errors import InvalidInputError
from . import json_body

__all__ = [
    "HEADER_LENGTH",
    "InferBody",
    "Tensor",
    "binary_output_names",
    "encode_reply",
    "inputs_of",
    "outputs_of",
    "parse_body",
]

HEADER_LENGTH = "Inference-Header-Content-Length"
UINT64_MAX = 2**64 - 1
CLASSIFICATION = "classification"


@dataclass(frozen=True, slots=True)
class Tensor:
    """One input tensor as the body carried it: ``data`` is raw bytes (FP32) or elements (BYTES)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes | memoryview | list[bytes]
    where: str


@dataclass(frozen=True, slots=True)
class InferBody:
    """A parsed inference request, checked for structure but not yet against a model."""

    id: str
    parameters: Mapping[str, Any]
    inputs: tuple[Tensor, ...]
    outputs: tuple[Mapping[str, Any], ...]

    def deadline(self, now: float | None = None) -> float | None:
        """Triton's ``timeout`` request parameter (microseconds) as a ``time.monotonic()`` deadline."""
        timeout = self.parameters.get("timeout")
        if timeout is None:
            return None
        return (time.monotonic() if now is None else now) + timeout / 1e6

    def binary_outputs(self) -> bool:
        """Whether outputs without their own ``binary_data`` come back binary (``binary_data_output``)."""
        return _flag(self.parameters, "binary_data_output", "parameters")


def parse_body(body: bytes, header_length: str | None) -> InferBody:
    """Split and parse an inference body; InvalidInputError names what is malformed and where."""
    view = memoryview(body)
    if header_length is None:
        split = len(view)
    else:
        try:
            split = int(header_length)
        except ValueError:
            split = -1
        if not 0 <= split <= len(view):
            raise InvalidInputError(
                f"{HEADER_LENGTH}: expected the JSON header's length in bytes, 0..{len(view)} "
                f"(the body's size), got {header_length!r}"
            )
    where = "request body" if header_length is None else "JSON header"
    header = json_body.loads(view[:split], where, "a JSON inference request")
    if not isinstance(header, dict):
        raise InvalidInputError(
            f"request body: expected a JSON object with 'inputs', got a {type(header).__name__}"
        )
    params = _parameters(_object(header.get("parameters", {}), "parameters"))
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInputError(f"id: expected a string, got {type(request_id).__name__}")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInputError("inputs: expected a non-empty list of input tensors")
    binary = view[split:]
    pos = 0
    inputs = []
    for i, raw in enumerate(raw_inputs):
        tensor, used = _tensor(_object(raw, f"inputs[{i}]"), i, binary[pos:])
        inputs.append(tensor)
        pos += used
    if pos != len(binary):
        raise InvalidInputError(
            f"binary data: {len(binary)} bytes follow the JSON header but the inputs' "
            f"binary_data_size parameters add up to {pos}"
        )
    raw_outputs = header.get("outputs", [])
    if not isinstance(raw_outputs, list):
        raise InvalidInputError("outputs: expected a list of requested outputs")
    outputs = tuple(_object(o, f"outputs[{i}]") for i, o in enumerate(raw_outputs))
    return InferBody(request_id, params, tuple(inputs), outputs)


# Request parameters Triton defines, with the types it reads them as: checked even where convserve does not
# act on them (priority, sequences), so a value Triton would refuse is refused here too.
_UINT64 = "an integer in 0..2**64-1"
_BOOL = "true or false"
_REQUEST_PARAMETERS = {
    "timeout": "an integer of microseconds in 0..2**64-1",
    "priority": _UINT64,
    "classification": "an integer class count",
    "sequence_id": f"{_UINT64} or a string",
    "sequence_start": _BOOL,
    "sequence_end": _BOOL,
    "binary_data_output": _BOOL,
}


def _is_uint64(value: Any) -> bool:
    return type(value) is int and 0 <= value <= UINT64_MAX


def _parameters(params: dict[str, Any]) -> dict[str, Any]:
    """The request's parameters, each one Triton defines checked against its type and range."""
    for key, value in params.items():
        expected = _REQUEST_PARAMETERS.get(key)
        if expected is None:
            continue
        if expected == _BOOL:
            ok = type(value) is bool
        else:
            ok = _is_uint64(value) or (key == "sequence_id" and type(value) is str)
        if not ok:
            raise InvalidInputError(f"parameters.{key}: expected {expected}, got {value!r}"[:300])
    return params


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInputError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _flag(params: Mapping[str, Any], key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInputError(f"{where}.{key}: expected true or false, got {value!r}")
    return value


def _tensor(raw: dict[str, Any], i: int, binary: memoryview) -> tuple[Tensor, int]:
    """One input entry → Tensor, and how many bytes of the binary section it took."""
    name = raw.get("name")
    if not isinstance(name, str):
        raise InvalidInputError(f"inputs[{i}].name: expected a string, got {name!r}")
    where = f"inputs[{name!r}]"
    datatype = raw.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidInputError(f"{where}.datatype: expected a string such as 'FP32', got {datatype!r}")
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidInputError(f"{where}.shape: expected a list of non-negative integers, got {shape!r}")
    params = _object(raw.get("parameters", {}), f"{where}.parameters")
    size = params.get("binary_data_size")
    if size is not None:
        if not _is_uint64(size):
            raise InvalidInputError(
                f"{where}.parameters.binary_data_size: expected a byte count, got {size!r}"
            )
        if "data" in raw:
            raise InvalidInputError(f"{where}: has both binary_data_size and JSON 'data'; send one")
        if size > len(binary):
            raise InvalidInputError(
                f"{where}.parameters.binary_data_size: claims {size} bytes, only {len(binary)} "
                "binary bytes remain after the JSON header"
            )
        chunk = binary[:size]
        # Raw tensor bytes stay a view of the body: no copy before the model sees them.
        data = deserialize_bytes(chunk, where) if datatype == "BYTES" else chunk
        return Tensor(name, datatype, tuple(shape), data, where), size
    if "data" not in raw:
        raise InvalidInputError(f"{where}: expected JSON 'data' or a binary_data_size parameter")
    return Tensor(name, datatype, tuple(shape), _json_data(raw["data"], datatype, shape, where), where), 0


def _json_data(data: Any, datatype: str, shape: list[int], where: str) -> bytes | list[bytes]:
    """A JSON ``data`` array (flat or nested, row-major) as raw FP32 bytes or BYTES elements."""
    if not isinstance(data, list):
        raise InvalidInputError(f"{where}.data: expected a JSON array, got {type(data).__name__}")
    items = json_body.tensor_elements(data, datatype, where)
    if datatype == "BYTES":
        return [s.encode() for s in items]
    if datatype != "FP32":
        return b""  # the datatype is refused with the model's expectations once the model is known
    with np.errstate(over="ignore"):  # a value past FP32's range becomes inf, refused below
        arr = np.array(items, dtype="<f4")
    if arr.size != math.prod(shape):
        raise InvalidInputError(
            f"{where}.data: shape {shape} needs {math.prod(shape)} values, got {arr.size}"
        )
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"{where}.data: expected FP32 values, got numbers beyond FP32's range")
    return arr.tobytes()


# ---- against the model ------------------------------------------------------------------------------------


def inputs_of(body: InferBody, cfg: ModelConfig) -> list[Input]:
    """The body's single input as domain inputs: one FP32 [N, C, H, W] tensor, or BYTES encoded images."""
    if len(body.inputs) != 1:
        raise InvalidInputError(
            f"inputs: expected exactly one input tensor named {cfg.input.name!r}, got {len(body.inputs)}"
        )
    t = body.inputs[0]
    if t.name != cfg.input.name:
        raise InvalidInputError(f"inputs[0].name: expected {cfg.input.name!r}, got {t.name!r}")
    if t.datatype == "FP32":
        if len(t.shape) != 4:
            raise InvalidInputError(
                f"{t.where}.shape: expected [N, {', '.join(map(str, cfg.input.shape))}], got {list(t.shape)}"
            )
        return [TensorInput(t.data, "float32", t.shape, t.where)]  # type: ignore[arg-type]
    if t.datatype == "BYTES":
        blobs = t.data
        if not blobs:
            raise InvalidInputError(f"{t.where}: expected at least one encoded image, got none")
        n = len(blobs)
        if t.shape not in ((n,), (n, 1)):
            raise InvalidInputError(
                f"{t.where}.shape: {n} encoded images need shape [{n}] or [{n}, 1], got {list(t.shape)}"
            )
        return [EncodedImage(b, f"{t.where}[{i}]") for i, b in enumerate(blobs)]  # type: ignore[arg-type]
    raise InvalidInputError(
        f"{t.where}.datatype: expected FP32 (a [N, C, H, W] tensor) or BYTES (encoded images), "
        f"got {t.datatype!r}"
    )


def _class_count(params: Mapping[str, Any], where: str) -> int:
    k = params.get(CLASSIFICATION, 0)
    if isinstance(k, bool) or not isinstance(k, int):
        raise InvalidInputError(f"{where}.classification: expected an integer class count, got {k!r}")
    return k


def outputs_of(body: InferBody, cfg: ModelConfig) -> list[RequestedOutput]:
    """Each requested output (classification k, or None for the raw tensor); the model's output when none
    is named. Duplicates are refused by the core."""
    default_k = _class_count(body.parameters, "parameters")
    if not body.outputs:
        name = cfg.output.name
        return [RequestedOutput(name, default_k or None, f"outputs[{name!r}].classification")]
    wanted = []
    for i, out in enumerate(body.outputs):
        given = out.get("name")
        if given != cfg.output.name:
            raise InvalidInputError(f"outputs[{i}].name: expected {cfg.output.name!r}, got {given!r}")
        params = _object(out.get("parameters", {}), f"outputs[{i}].parameters")
        k = _class_count(params, f"outputs[{i}].parameters") or default_k
        if k < 0:
            raise InvalidInputError(
                f"outputs[{i}].parameters.classification: expected 1..{cfg.num_classes}, got {k}"
            )
        _flag(params, "binary_data", f"outputs[{i}].parameters")
        name = cfg.output.name
        wanted.append(RequestedOutput(name, k or None, f"outputs[{name!r}].classification"))
    return wanted


def binary_output_names(body: InferBody) -> frozenset[str] | None:
    """Names of outputs to send binary; None means every output (``binary_data_output``, none named)."""
    default = body.binary_outputs()
    if not body.outputs:
        return None if default else frozenset()
    named = []
    for i, out in enumerate(body.outputs):
        params = _object(out.get("parameters", {}), f"outputs[{i}].parameters")
        if params.get("binary_data", default) is True:
            named.append(str(out.get("name", "")))
    return frozenset(named)


def encode_reply(
    result: InferenceResult, request_id: str, binary: frozenset[str] | None
) -> tuple[bytes, int | None]:
    """The reply body and, when binary data follows the JSON, the JSON header's length.

    Raw outputs are FP32 ``[N, K]``; classification outputs BYTES ``[N, k]`` of ``"score:index:label"``.
    """
    outputs = []
    chunks: list[bytes] = []
    for out in result.outputs:
        as_binary = binary is None or out.name in binary
        if out.raw is None:
            strings = classification_strings(out.indices, out.scores, result.labels)  # type: ignore[arg-type]
            shape = list(out.indices.shape)  # type: ignore[union-attr]
            entry: dict[str, Any] = {"name": out.name, "datatype": "BYTES", "shape": shape}
            if as_binary:
                chunk = serialize_bytes([s.encode() for s in strings])
            else:
                entry["data"] = strings
        else:
            entry = {"name": out.name, "datatype": "FP32", "shape": list(out.raw.shape)}
            if as_binary:
                chunk = np.ascontiguousarray(out.raw, dtype="<f4").tobytes()
            else:
                entry["data"] = out.raw.ravel().tolist()
        if as_binary:
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        outputs.append(entry)
    reply: dict[str, Any] = {"model_name": result.model, "model_version": str(result.version)}
    if request_id:
        reply["id"] = request_id
    reply["outputs"] = outputs
    header = json.dumps(reply, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)
