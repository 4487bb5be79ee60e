"""A few lines of plain-urllib HTTP for the REST tests: no client library between the test and the wire."""

from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str:
        return self.json()["error"]


def call(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> Reply:
    """One HTTP request; error statuses come back as a Reply, not an exception."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return Reply(reply.status, reply.headers, reply.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.headers, exc.read())


def get(url: str, **kw: Any) -> Reply:
    return call("GET", url, **kw)


def post_json(url: str, obj: Any, headers: dict[str, str] | None = None) -> Reply:
    return call(
        "POST", url, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})}
    )


def post_binary(
    url: str, header: dict[str, Any], binary: bytes, headers: dict[str, str] | None = None
) -> Reply:
    """Triton's binary-tensor extension: the JSON header, then the raw tensor bytes."""
    text = json.dumps(header).encode()
    all_headers = {
        HEADER_LENGTH: str(len(text)),
        "Content-Type": "application/octet-stream",
        **(headers or {}),
    }
    return call("POST", url, text + binary, all_headers)


def split_reply(reply: Reply) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A binary reply → (its JSON header, {output name: its binary bytes})."""
    n = int(reply.headers[HEADER_LENGTH])
    header = json.loads(reply.body[:n])
    chunks, pos = {}, n
    for out in header["outputs"]:
        size = out.get("parameters", {}).get("binary_data_size")
        if size is not None:
            chunks[out["name"]] = reply.body[pos : pos + size]
            pos += size
    assert pos == len(reply.body)
    return header, chunks


def bytes_elements(raw: bytes) -> list[bytes]:
    """A BYTES tensor's wire form → its elements (4-byte little-endian length, then the bytes)."""
    items, pos = [], 0
    while pos < len(raw):
        (n,) = struct.unpack_from("<I", raw, pos)
        items.append(raw[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return items


def serialize_elements(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)
