"""Triton's REST JSON for its protobuf messages: proto field names, every field, 64-bit ints as numbers.

Triton's REST answers for metadata, model configuration, statistics and the repository index are the
JSON form of the same messages its gRPC service sends, with two differences from protobuf's canonical
JSON mapping that clients rely on: fields keep their proto names (``max_batch_size``, not
``maxBatchSize``) and 64-bit integers are numbers (``"dims": [1, 28, 28]``, not strings). Triton's
image client reads ``max_batch_size`` even when it is 0, so fields at their default are printed too.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

__all__ = ["message_json"]

_INT64 = frozenset(
    (
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    )
)


def message_json(message: Message) -> dict[str, Any]:
    """``message`` as Triton's REST JSON object."""
    obj = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _numbers(message.DESCRIPTOR, obj)
    return obj


def _numbers(descriptor: Descriptor, obj: dict[str, Any]) -> None:
    """Turn protobuf's string-encoded 64-bit integers back into numbers, in place, recursively."""
    for key, value in obj.items():
        f = descriptor.fields_by_name.get(key)
        if f is None:
            continue
        if f.message_type is not None:
            if f.message_type.GetOptions().map_entry:
                vf = f.message_type.fields_by_name["value"]
                if vf.message_type is not None:
                    for item in value.values():
                        _numbers(vf.message_type, item)
                elif vf.type in _INT64:
                    obj[key] = {k: int(v) for k, v in value.items()}
            elif isinstance(value, list):
                for item in value:
                    _numbers(f.message_type, item)
            elif isinstance(value, dict):
                _numbers(f.message_type, value)
        elif f.type in _INT64:
            obj[key] = [int(v) for v in value] if isinstance(value, list) else int(value)
