"""HTTP/1.1 on one raw loopback socket: pipelined requests answered in order, a malformed one answered
after the good ones and then the connection closed (as nginx does), keep-alive otherwise, aiohttp's own
parser errors in the v2 JSON error form, and ``Connection: close`` while draining."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
from rest_client import HEADER_LENGTH, get

_DEADLINE_S = 30.0


class RawConnection:
    """One TCP connection read by hand: every byte the server sends is accounted for."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=_DEADLINE_S)
        self.buffer = b""
        self.deadline = time.monotonic() + _DEADLINE_S

    def close(self) -> None:
        self.sock.close()

    def _more(self) -> bool:
        """Read once more; False at EOF. The socket timeout and the deadline bound every wait."""
        if time.monotonic() > self.deadline:
            raise TimeoutError("the server took longer than the test's deadline")
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next response: (status, lower-cased headers, body by Content-Length)."""
        while b"\r\n\r\n" not in self.buffer:
            if not self._more():
                raise EOFError(f"connection closed before a response; {len(self.buffer)} bytes left")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        size = int(headers["content-length"])
        while len(self.buffer) < size:
            if not self._more():
                raise EOFError("connection closed inside a response body")
        body, self.buffer = self.buffer[:size], self.buffer[size:]
        return status, headers, body

    def at_eof(self) -> bool:
        """True when the server closed the connection with nothing more sent."""
        return not self.buffer and not self._more()


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


def _port(rest: str) -> int:
    return int(rest.rsplit(":", 1)[1])


# Request lines or headers aiohttp's parser refuses before any route or middleware sees them.
MALFORMED = [
    b"GET /v2/health/ready HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header Name: x\r\n\r\n",
    b"GE(T /v2/health/ready HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET /v2/health/ready HTTP/9.9.9\r\n\r\n",
]


def test_good_requests_pipelined_before_a_malformed_one_are_answered_in_order(rest: str) -> None:
    paths = ["/v2/models/gray", "/v2/models/gray/versions/1/ready"]
    alone = [get(f"{rest}{p}") for p in paths]  # the same requests, one per connection: the reference
    for malformed in MALFORMED:
        conn = RawConnection(_port(rest))
        try:
            conn.sock.sendall(b"".join(_get(p) for p in paths) + malformed)
            for reference in alone:
                status, _, body = conn.response()
                assert (status, json.loads(body)) == (reference.status, reference.json()), malformed
            status, headers, body = conn.response()
            assert status == 400 and headers["content-type"].startswith("application/json"), body
            error = json.loads(body)
            assert set(error) == {"error"} and error["error"].startswith("malformed HTTP request: ")
            assert conn.at_eof(), conn.buffer
        finally:
            conn.close()
    assert get(f"{rest}/v2/health/ready").status == 200


def test_pipelined_requests_keep_the_connection_alive(rest: str) -> None:
    conn = RawConnection(_port(rest))
    try:
        conn.sock.sendall(_get("/v2/health/live") + _get("/v2/models/gray/ready"))
        assert [conn.response()[0] for _ in range(2)] == [200, 200]
        conn.sock.sendall(_get("/v2/health/ready"))
        status, headers, body = conn.response()
        assert (status, json.loads(body)) == (200, {"ready": True})
        assert headers.get("connection", "keep-alive").lower() != "close"
    finally:
        conn.close()


def test_a_malformed_request_alone_gets_the_v2_json_error(rest: str) -> None:
    conn = RawConnection(_port(rest))
    try:
        conn.sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: 127.0.0.1\r\n: no name\r\n\r\n")
        status, headers, body = conn.response()
        assert status == 400 and headers["content-type"].startswith("application/json")
        assert json.loads(body)["error"].startswith("malformed HTTP request: ")
        assert headers["x-request-id"]  # the id its failed-request log line carries
        assert conn.at_eof()
    finally:
        conn.close()


def test_binary_body_full_of_header_terminators_is_read_whole(
    rest: str, model_repository: Path, run_reference: Any
) -> None:
    # Every 4 bytes of the tensor are "\r\n\r\n": the connection must not mistake body bytes for the end
    # of a header block, however its reads are cut, and the pipelined request after it is answered too.
    n = 8
    raw = b"\r\n\r\n" * (n * 3 * 48 * 48)
    x = np.frombuffer(raw, dtype="<f4").reshape(n, 3, 48, 48)
    tensor = {"name": "input", "datatype": "FP32", "shape": list(x.shape)}
    tensor["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps({"inputs": [tensor], "outputs": [{"name": "logits"}]}).encode()
    request = (
        b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/octet-stream\r\n"
        + f"{HEADER_LENGTH}: {len(header)}\r\nContent-Length: {len(header) + len(raw)}\r\n\r\n".encode()
        + header
        + raw
    )
    conn = RawConnection(_port(rest))
    try:
        conn.sock.sendall(request + _get("/v2/health/ready"))
        status, _, body = conn.response()
        assert status == 200, body[:300]
        got = np.array(json.loads(body)["outputs"][0]["data"], dtype=np.float32).reshape(n, -1)
        want = run_reference(model_repository / "slow" / "1" / "model.onnx", x)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert conn.response()[0] == 200
    finally:
        conn.close()


def test_draining_answers_with_connection_close(server_factory: Any) -> None:
    handle = server_factory()
    handle.call(handle.running.health.drain())
    conn = RawConnection(handle.http_port)
    try:
        conn.sock.sendall(_get("/v2/health/live"))
        status, headers, _ = conn.response()
        assert status == 200 and headers["connection"].lower() == "close"
        assert conn.at_eof()
    finally:
        conn.close()
