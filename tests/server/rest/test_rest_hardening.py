"""REST under hostile or unlucky conditions: bodies that lie about their size, fuzzed bodies, and a drain
with a REST request in flight. Every case ends with the server still answering."""

from __future__ import annotations

import gzip
import http.client
import json
import threading
import time
import urllib.error
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_client import HEADER_LENGTH, call, get, post_binary, post_json

ZERO = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}]}


def _raw(port: int, headers: dict[str, str], body: Any, chunked: bool = False) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v2/models/gray/infer", body=body, headers=headers, encode_chunked=chunked)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def test_chunked_body_over_the_limit_is_413(server_factory: Any) -> None:
    handle = server_factory(max_message_bytes=8192)
    chunks = (b"x" * 4096 for _ in range(16))  # no Content-Length: aiohttp's bound stops the read
    status, body = _raw(handle.http_port, {"Transfer-Encoding": "chunked"}, chunks, chunked=True)
    assert status == 413 and b"over the largest message" in body
    assert post_json(f"{handle.http_url}/v2/models/gray/infer", ZERO).status == 200


def test_gzip_body_that_inflates_past_the_limit_is_413(server_factory: Any) -> None:
    handle = server_factory(max_message_bytes=64 * 1024)
    bomb = gzip.compress(b"[" + b"0," * 4_000_000 + b"0]")  # ~8 MB inflated, a few KB on the wire
    assert len(bomb) < 64 * 1024
    status, body = _raw(
        handle.http_port, {"Content-Encoding": "gzip", "Content-Type": "application/json"}, bomb
    )
    assert status == 413, body
    compressed = gzip.compress(json.dumps(ZERO).encode())
    status, body = _raw(handle.http_port, {"Content-Encoding": "gzip"}, compressed)
    assert status == 200, body


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_tensor = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["input", "x", 3]),
        "datatype": st.sampled_from(["FP32", "BYTES", "INT8", None]),
        "shape": st.lists(st.integers(-1, 9), max_size=5),
        "data": st.lists(st.floats(allow_nan=False, width=32) | st.text(max_size=3), max_size=70) | _json,
        "parameters": st.dictionaries(
            st.sampled_from(["binary_data_size", "classification"]), _json, max_size=2
        ),
    },
)
_request = st.fixed_dictionaries(
    {},
    optional={
        "inputs": st.lists(_tensor, max_size=2) | _json,
        "outputs": st.lists(st.dictionaries(st.sampled_from(["name", "parameters"]), _json), max_size=2)
        | _json,
        "parameters": st.dictionaries(
            st.sampled_from(["classification", "binary_data_output", "timeout"]), _json, max_size=3
        ),
        "id": _json,
    },
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_request, tail=st.binary(max_size=300), header_length=st.none() | st.integers(-2, 600))
def test_fuzzed_bodies_are_client_errors_never_internal(
    rest: str, body: dict[str, Any], tail: bytes, header_length: int | None
) -> None:
    text = json.dumps(body).encode()
    headers = {} if header_length is None else {HEADER_LENGTH: str(header_length)}
    reply = call(
        "POST", f"{rest}/v2/models/gray/infer", text + (tail if header_length is not None else b""), headers
    )
    assert reply.status in (200, 400, 429, 504), reply.body
    if reply.status != 200:
        assert reply.error and "internal error" not in reply.error


def test_fuzz_left_the_server_serving(rest: str) -> None:
    assert post_json(f"{rest}/v2/models/gray/infer", ZERO).status == 200
    assert get(f"{rest}/v2/health/ready").status == 200


def test_drain_lets_an_in_flight_rest_request_finish_then_closes_the_port(server_factory: Any) -> None:
    handle = server_factory()
    x = np.random.default_rng(0).normal(0, 1, (160, 3, 48, 48)).astype(np.float32)  # "slow": >1 s in all
    header = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                          "parameters": {"binary_data_size": x.nbytes}}]}  # fmt: skip
    url = f"{handle.http_url}/v2/models/slow/infer"
    replies: list[Any] = []
    worker = threading.Thread(target=lambda: replies.append(post_binary(url, header, x.tobytes())))
    worker.start()
    deadline = time.monotonic() + 10
    labels = {"model": "slow", "version": "1", "api": "rest"}
    while not handle.registry.get_sample_value("convserve_inflight_requests", labels):
        assert time.monotonic() < deadline, "the request never arrived"
        time.sleep(0.005)
    handle.call(handle.running.stop(10.0), timeout=30)
    worker.join(30)
    (reply,) = replies
    assert reply.status == 200, reply.body
    assert reply.json()["outputs"][0]["shape"] == [160, 4]
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        get(f"{handle.http_url}/v2/health/live", timeout=2)


def test_a_client_that_goes_away_cancels_its_work(server_factory: Any) -> None:
    """aiohttp cancels the handler when the connection closes; the core stops the request (CANCELLED)."""
    import socket

    handle = server_factory()
    x = np.random.default_rng(1).normal(0, 1, (160, 3, 48, 48)).astype(np.float32)  # "slow": >1 s in all
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()  # fmt: skip
    body = header + x.tobytes()
    request = (
        f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        f"{HEADER_LENGTH}: {len(header)}\r\n\r\n"
    ).encode() + body
    labels = {"model": "slow", "version": "1", "api": "rest"}
    with socket.create_connection(("127.0.0.1", handle.http_port), timeout=10) as sock:
        sock.sendall(request)
        deadline = time.monotonic() + 10
        while not handle.registry.get_sample_value("convserve_inflight_requests", labels):
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.005)
    cancelled = {**labels, "code": "CANCELLED"}
    deadline = time.monotonic() + 10
    while not handle.registry.get_sample_value("convserve_requests_total", cancelled):
        assert time.monotonic() < deadline, "the abandoned request was not cancelled"
        time.sleep(0.01)
    assert not handle.registry.get_sample_value("convserve_requests_total", {**labels, "code": "OK"})
    assert post_json(f"{handle.http_url}/v2/models/gray/infer", ZERO).status == 200


def test_absurdly_nested_json_is_refused_before_it_is_parsed(rest: str) -> None:
    body = b"[" * 200_000 + b"]" * 200_000
    reply = call("POST", f"{rest}/v2/models/gray/infer", body)
    assert reply.status == 413 and "up to 200000 JSON arrays" in reply.error, reply.body
    deep = b"[" * 2_000 + b"]" * 2_000  # within the array bound, deeper than the parser goes
    reply = call("POST", f"{rest}/v2/models/gray/infer", deep)
    assert reply.status == 400 and "does not parse" in reply.error, reply.body
    assert post_json(f"{rest}/v2/models/gray/infer", ZERO).status == 200


def _tensor_body(data: bytes, shape: list[int]) -> bytes:
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": []}]})
    return head.replace('"data": []', '"data": [' + data.decode() + "]").encode()


# The bodies that stalled the server: millions of numbers or of small arrays. Each is refused by a byte
# count before a parser sees it, and the refusal names the binary tensor extension (the way to send big
# tensors); the limits themselves are MAX_JSON_* in server/rest/json_body.py.
JSON_FLOODS = [
    ("5 MB of numbers", b",".join([b"0.5"] * 1_300_000), [1_300_000], "bytes of JSON, over the 4194304"),
    ("2 M numbers", b",".join([b"0"] * 2_000_000), [2_000_000], "JSON values (',' separated), over"),
    ("500 k arrays", b",".join([b"[0]"] * 500_000), [500_000, 1], "JSON arrays ('[' characters), over"),
]


@pytest.mark.parametrize("case", JSON_FLOODS, ids=[c[0] for c in JSON_FLOODS])
def test_json_bodies_past_the_bounds_are_413_naming_the_binary_extension(
    rest: str, case: tuple[Any, ...]
) -> None:
    _, data, shape, fragment = case
    reply = call("POST", f"{rest}/v2/models/gray/infer", _tensor_body(data, shape))
    assert reply.status == 413 and fragment in reply.error, reply.body[:300]
    assert "binary tensor extension" in reply.error and "binary_data_size" in reply.error
    assert get(f"{rest}/v2/health/ready").status == 200
    assert post_json(f"{rest}/v2/models/gray/infer", ZERO).status == 200
