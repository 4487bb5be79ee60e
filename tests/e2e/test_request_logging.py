"""A real server's request logs: one structured line per failed request, the JSON access log, request ids
taken from `x-request-id` (or generated) and echoed in trailing metadata."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc as pb_grpc
from convserve.server.observability import logs as ls
from convserve.server.observability.request_ids import REQUEST_ID_KEY

MODEL = "gray"  # 1x8x8 grayscale in the test repository (tests/conftest.py)


@pytest.fixture
def log_stream() -> Iterator[Callable[[bool], io.StringIO]]:
    """`configure(access_log)` sends the convserve loggers to a fresh buffer as JSON; restored afterwards."""
    root = logging.getLogger("convserve")
    saved = (list(root.handlers), root.level, root.propagate, logging.getLogger(ls.ACCESS_LOGGER).level)

    def configure(access_log: bool) -> io.StringIO:
        stream = io.StringIO()
        ls.configure_logging("INFO", "json", access_log=access_log, stream=stream)
        return stream

    try:
        yield configure
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        root.propagate = saved[2]
        logging.getLogger(ls.ACCESS_LOGGER).setLevel(saved[3])


def records(stream: io.StringIO, want: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """The JSON lines logged so far, once `want` holds (lines are written on the server's thread)."""
    deadline = time.monotonic() + 5.0
    while True:
        lines = [json.loads(line) for line in stream.getvalue().splitlines() if line]
        if want(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def tensor_image() -> pb.Image:
    data = np.random.default_rng(0).random((1, 8, 8), dtype=np.float32)
    return pb.Image(tensor=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 8, 8], data=data.tobytes()))


def trailing_request_id(call: Any) -> str:
    return dict(call.trailing_metadata())[REQUEST_ID_KEY]


def test_failed_request_logs_one_structured_line_with_the_clients_request_id(
    server: Any, log_stream: Any
) -> None:
    stream = log_stream(access_log=True)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        bad = pb.ClassifyRequest(model=MODEL, images=[pb.Image(encoded=b"\x89PNG truncated")])
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(bad, metadata=[(REQUEST_ID_KEY, "client-trace-7")], timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert trailing_request_id(err.value) == "client-trace-7"

        lines = records(stream, lambda rs: sum(r.get("request_id") == "client-trace-7" for r in rs) >= 2)
    mine = [r for r in lines if r.get("request_id") == "client-trace-7"]
    failed = [r for r in mine if r["event"] == "request_failed"]
    access = [r for r in mine if r["event"] == "access"]
    assert len(failed) == 1 and len(access) == 1, mine
    (line,) = failed
    assert line["level"] == "WARNING" and line["logger"] == ls.REQUESTS_LOGGER
    assert line["code"] == "INVALID_ARGUMENT" and line["reason"] == "invalid_input"
    assert line["method"] == "/convserve.v1.Classifier/Classify"
    assert line["model"] == MODEL
    assert line["error"] == err.value.details()
    assert line["duration_ms"] >= 0 and "exc" not in line
    assert access[0]["code"] == "INVALID_ARGUMENT"

    # The server keeps serving: a good request right after succeeds.
    with grpc.insecure_channel(server.address) as channel:
        reply = pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(model=MODEL, images=[tensor_image()]), timeout=10
        )
    assert len(reply.results) == 1


def test_access_log_line_per_request_with_a_generated_id_echoed_back(server: Any, log_stream: Any) -> None:
    stream = log_stream(access_log=True)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        reply, call = stub.Classify.with_call(
            pb.ClassifyRequest(model=MODEL, images=[tensor_image(), tensor_image()]), timeout=10
        )
        rid = trailing_request_id(call)
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(pb.ClassifyRequest(model="no-such-model", images=[tensor_image()]), timeout=10)
        missing_rid = trailing_request_id(err.value)
    assert len(rid) == 32 and int(rid, 16) >= 0 and missing_rid != rid
    assert reply.request_id == rid  # the reply body carries the same id

    lines = records(
        stream, lambda rs: rid in {r.get("request_id") for r in rs} and
        sum(r.get("request_id") == missing_rid for r in rs) >= 2,
    )  # fmt: skip
    (ok,) = [r for r in lines if r.get("request_id") == rid]
    assert ok["event"] == "access" and ok["logger"] == ls.ACCESS_LOGGER and ok["level"] == "INFO"
    assert ok["code"] == "OK" and ok["model"] == MODEL and ok["images"] == 2
    assert ok["version"] == str(reply.version) and ok["duration_ms"] > 0
    assert ok["peer"]
    events = sorted(r["event"] for r in lines if r.get("request_id") == missing_rid)
    assert events == ["access", "request_failed"]


def test_access_log_off_logs_only_failures(server: Any, log_stream: Any) -> None:
    stream = log_stream(access_log=False)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        stub.Classify(pb.ClassifyRequest(model=MODEL, images=[tensor_image()]), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.Classify(pb.ClassifyRequest(model=MODEL, images=[]), timeout=10)
    lines = records(stream, lambda rs: any(r.get("event") == "request_failed" for r in rs))
    assert [r["event"] for r in lines if "event" in r] == ["request_failed"]
    assert lines[-1]["code"] == "INVALID_ARGUMENT"


def test_rest_requests_write_the_same_access_and_failure_lines(server: Any, log_stream: Any) -> None:
    import urllib.error
    import urllib.request

    stream = log_stream(access_log=True)
    x = np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)

    def post(body: dict[str, Any], rid: str) -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.http_port}/v2/models/{MODEL}/infer",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", REQUEST_ID_KEY: rid},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                assert reply.headers[REQUEST_ID_KEY] == rid
                return reply.status
        except urllib.error.HTTPError as exc:
            assert exc.headers[REQUEST_ID_KEY] == rid
            return exc.code

    good = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 1, 8, 8], "data": x.ravel().tolist()}]
    }
    assert post(good, "rest-ok-1") == 200
    bad = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 2, 2], "data": [0.0] * 4}]}
    assert post(bad, "rest-bad-1") == 400
    lines = records(
        stream, lambda rs: sum(r.get("request_id") in ("rest-ok-1", "rest-bad-1") for r in rs) >= 3
    )
    (ok,) = [r for r in lines if r.get("request_id") == "rest-ok-1"]
    assert ok["event"] == "access" and ok["code"] == "OK" and ok["images"] == 3
    assert ok["method"] == "POST /v2/models/{model}/infer" and ok["model"] == MODEL and ok["version"] == "2"
    failed = [r for r in lines if r.get("request_id") == "rest-bad-1"]
    (line,) = [r for r in failed if r["event"] == "request_failed"]
    assert line["code"] == "INVALID_ARGUMENT" and line["reason"] == "invalid_input" and "exc" not in line
    assert "expected shape [1, 8, 8]" in line["error"] and line["model"] == MODEL
    assert [r["code"] for r in failed if r["event"] == "access"] == ["INVALID_ARGUMENT"]
