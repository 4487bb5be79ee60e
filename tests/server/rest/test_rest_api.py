"""The v2 REST front end against a real server: health, metadata, inference (JSON and binary tensors,
classification), bad input, auth and drain. Raw HTTP through urllib, so the wire form itself is tested;
numbers are compared with ONNX Runtime run in-process on the same model file."""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rest_client import (
    HEADER_LENGTH,
    bytes_elements,
    call,
    get,
    post_binary,
    post_json,
    serialize_elements,
    split_reply,
)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _batch(n: int, seed: int, shape: tuple[int, ...] = (1, 8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, *shape)).astype(np.float32)


def _json_input(x: np.ndarray) -> dict[str, Any]:
    return {"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}


def _assert_still_serving(rest: str, model_repository: Path, run_reference: Any) -> None:
    x = _batch(2, 99)
    reply = post_json(f"{rest}/v2/models/gray/infer", {"inputs": [_json_input(x)]})
    assert reply.status == 200, reply.body
    got = np.array(reply.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(
        got, run_reference(model_repository / "gray" / "2" / "model.onnx", x), atol=1e-5
    )


# ---- health and metadata ------------------------------------------------------------------------------


def test_health_and_readiness_answer_json_bodies_and_400_when_a_model_is_not_ready(rest: str) -> None:
    # The Open Inference Protocol's bodies, as KServe's REST client reads them; 4xx means "not ready".
    for path, body in (
        ("/v2/health/live", {"live": True}),
        ("/v2/health/ready", {"ready": True}),
        ("/v2/models/gray/ready", {"name": "gray", "ready": True}),
        ("/v2/models/gray/versions/1/ready", {"name": "gray", "ready": True}),
    ):
        reply = get(f"{rest}{path}")
        assert reply.status == 200 and reply.json() == body, (path, reply.body)
        assert reply.headers["Content-Type"].startswith("application/json")
    failed = get(f"{rest}/v2/models/mismatch/ready")
    assert failed.status == 400 and "model 'mismatch' is not ready" in failed.error
    retired = get(f"{rest}/v2/models/latest/versions/1/ready")  # on disk, not served (latest 1 policy)
    assert retired.status == 400 and "no version 1" in retired.error
    # Unknown models and versions are "not ready" too (Triton's answer), not 404.
    unknown = get(f"{rest}/v2/models/nope/ready")
    assert unknown.status == 400 and "no model named 'nope'" in unknown.error
    missing = get(f"{rest}/v2/models/gray/versions/7/ready")
    assert missing.status == 400 and "no version 7" in missing.error
    assert set(missing.json()) == {"error"}
    malformed = get(f"{rest}/v2/models/gray/versions/x/ready")
    assert malformed.status == 400 and "expected a positive integer version" in malformed.error


def test_server_and_model_metadata_match_the_grpc_answers(rest: str, v2: Any) -> None:
    from convserve.protos.inference import grpc_service_pb2 as pb

    meta = get(f"{rest}/v2").json()
    grpc_meta = v2.ServerMetadata(pb.ServerMetadataRequest())
    assert meta["name"] == "convserve" and meta["version"] == grpc_meta.version
    assert meta["extensions"] == [*grpc_meta.extensions, "binary_tensor_data"]

    m = get(f"{rest}/v2/models/rgb").json()
    assert m["name"] == "rgb" and m["versions"] == ["1"] and m["platform"] == "onnxruntime_onnx"
    assert m["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 16, 16]}]
    assert m["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert get(f"{rest}/v2/models/gray").json()["versions"] == ["1", "2"]
    assert get(f"{rest}/v2/models/gray/versions/1").json()["versions"] == ["1"]
    missing = get(f"{rest}/v2/models/gray/versions/7")
    assert missing.status == 404 and "no version 7" in missing.error


def test_every_reply_carries_a_request_id_and_echoes_the_clients(rest: str) -> None:
    reply = get(f"{rest}/v2/health/live", headers={"x-request-id": "trace-42"})
    assert reply.headers["x-request-id"] == "trace-42"
    generated = get(f"{rest}/v2/models/nope")
    assert len(generated.headers["x-request-id"]) >= 16


# ---- inference ----------------------------------------------------------------------------------------


def test_json_tensor_in_json_logits_out(rest: str, model_repository: Path, run_reference: Any) -> None:
    x = _batch(3, 1)
    reply = post_json(f"{rest}/v2/models/gray/infer", {"id": "r1", "inputs": [_json_input(x)]})
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("gray", "2", "r1")
    (out,) = body["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("logits", "FP32", [3, 4])
    got = np.array(out["data"], dtype=np.float32).reshape(3, 4)
    np.testing.assert_allclose(
        got, run_reference(model_repository / "gray" / "2" / "model.onnx", x), atol=1e-5
    )


def test_nested_json_data_and_a_pinned_version(rest: str, model_repository: Path, run_reference: Any) -> None:
    x = _batch(2, 2)
    inp = {"name": "input", "datatype": "FP32", "shape": [2, 1, 8, 8], "data": x.tolist()}
    reply = post_json(f"{rest}/v2/models/gray/versions/1/infer", {"inputs": [inp]})
    assert reply.status == 200, reply.body
    assert reply.json()["model_version"] == "1"
    got = np.array(reply.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(
        got, run_reference(model_repository / "gray" / "1" / "model.onnx", x), atol=1e-5
    )


def test_binary_tensor_in_binary_logits_out(rest: str, model_repository: Path, run_reference: Any) -> None:
    x = _batch(5, 3)
    header = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [5, 1, 8, 8],
             "parameters": {"binary_data_size": x.nbytes}}
        ],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }  # fmt: skip
    reply = post_binary(f"{rest}/v2/models/gray/infer", header, x.tobytes())
    assert reply.status == 200, reply.body
    head, chunks = split_reply(reply)
    assert head["outputs"][0]["shape"] == [5, 4]
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 5 * 4 * 4}
    got = np.frombuffer(chunks["logits"], dtype="<f4").reshape(5, 4)
    np.testing.assert_allclose(
        got, run_reference(model_repository / "gray" / "2" / "model.onnx", x), atol=1e-5
    )


def test_binary_data_output_parameter_applies_when_no_output_is_named(rest: str) -> None:
    x = _batch(1, 4)
    reply = post_json(
        f"{rest}/v2/models/gray/infer",
        {"inputs": [_json_input(x)], "parameters": {"binary_data_output": True}},
    )
    head, chunks = split_reply(reply)
    assert set(chunks) == {"logits"} and len(chunks["logits"]) == 16 and "data" not in head["outputs"][0]


def test_png_images_as_binary_bytes_classified(
    rest: str, model_repository: Path, run_reference: Any, encode_png: Any
) -> None:
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    blobs = [encode_png(p) for p in pixels]
    raw = serialize_elements(blobs)
    header = {
        "inputs": [
            {"name": "input", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": len(raw)}}
        ],
        "outputs": [{"name": "logits", "parameters": {"classification": 2, "binary_data": True}}],
    }
    reply = post_binary(f"{rest}/v2/models/gray/infer", header, raw)
    assert reply.status == 200, reply.body
    head, chunks = split_reply(reply)
    assert (head["outputs"][0]["datatype"], head["outputs"][0]["shape"]) == ("BYTES", [3, 2])
    rows = [s.decode().split(":") for s in bytes_elements(chunks["logits"])]
    # The reference: the model's own preprocessing ((x/255 - 0.5) / 0.25), then ONNX Runtime and softmax.
    x = ((pixels.astype(np.float32) / 255.0 - 0.5) / 0.25)[:, None]
    probs = _softmax(run_reference(model_repository / "gray" / "2" / "model.onnx", x))
    for i in range(3):
        best = np.argsort(-probs[i])[:2]
        for j, (score, index, label) in enumerate(rows[i * 2 : i * 2 + 2]):
            assert int(index) == best[j] and label == f"class_{best[j]}"
            assert float(score) == pytest.approx(probs[i, best[j]], abs=1e-5)


def test_classification_in_json_from_the_request_parameter(
    rest: str, model_repository: Path, run_reference: Any
) -> None:
    x = _batch(2, 6, (3, 16, 16))
    body = {"inputs": [_json_input(x)], "parameters": {"classification": 3}}
    reply = post_json(f"{rest}/v2/models/rgb/infer", body)
    assert reply.status == 200, reply.body
    (out,) = reply.json()["outputs"]
    assert (out["datatype"], out["shape"]) == ("BYTES", [2, 3])
    probs = _softmax(run_reference(model_repository / "rgb" / "1" / "model.onnx", x))
    firsts = [int(out["data"][i * 3].split(":")[1]) for i in range(2)]
    assert firsts == [int(np.argmax(p)) for p in probs]


def test_timeout_parameter_already_passed_is_504_and_never_runs(
    rest: str, model_repository: Path, run_reference: Any
) -> None:
    x = _batch(1, 7)
    reply = post_json(
        f"{rest}/v2/models/gray/infer", {"inputs": [_json_input(x)], "parameters": {"timeout": 0}}
    )
    assert reply.status == 504 and "deadline" in reply.error
    _assert_still_serving(rest, model_repository, run_reference)


# ---- bad input: precise status and message, and the server keeps serving --------------------------------


def _one(shape: list[int], data: Any, datatype: str = "FP32", name: str = "input", **extra: Any) -> bytes:
    """A JSON inference body with one input tensor (and ``extra`` top-level fields)."""
    tensor = {"name": name, "datatype": datatype, "shape": shape, "data": data}
    return json.dumps({"inputs": [tensor], **extra}).encode()


_ZEROS = [0.0] * 64
_BINARY_256 = json.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                 "parameters": {"binary_data_size": 256}}]}
).encode()  # fmt: skip

BAD = [
    # (name, model, body bytes, extra headers, status, message fragment)
    ("not json", "gray", b"{inputs: oops", {}, 400, "expected a JSON inference request"),
    ("json array", "gray", b"[1, 2]", {}, 400, "expected a JSON object with 'inputs'"),
    ("no inputs", "gray", b'{"outputs": []}', {}, 400, "inputs: expected a non-empty list"),
    ("wrong name", "gray", _one([1, 1, 8, 8], _ZEROS, name="x"), {}, 400,
     "inputs[0].name: expected 'input', got 'x'"),
    ("wrong shape", "gray", _one([1, 1, 4, 16], _ZEROS), {}, 400,
     "expected shape [1, 8, 8] or [N, 1, 8, 8], got [1, 1, 4, 16]"),
    ("3-D shape", "gray", _one([1, 8, 8], _ZEROS), {}, 400, "shape: expected [N, 1, 8, 8], got [1, 8, 8]"),
    ("too few values", "gray", _one([1, 1, 8, 8], [0.0] * 60), {}, 400,
     "shape [1, 1, 8, 8] needs 64 values, got 60"),
    ("not numbers", "gray", _one([1, 1, 8, 8], ["a"] * 64), {}, 400, "expected numbers"),
    ("wrong datatype", "gray", _one([1, 1, 8, 8], [0] * 64, datatype="INT64"), {}, 400,
     "datatype: expected FP32 (a [N, C, H, W] tensor) or BYTES"),
    ("NaN", "gray", _one([1, 1, 8, 8], [float("nan")] * 64), {}, 400, "NaN and Infinity are not JSON"),
    # JSON types are strict: the elements' JSON type must be the datatype's, as Triton reads them.
    ("strings as FP32", "gray", _one([1, 1, 8, 8], ["0.5"] * 64), {}, 400,
     "inputs['input'].data: expected numbers for FP32, got strings"),
    ("booleans as FP32", "gray", _one([1, 1, 8, 8], [True] * 64), {}, 400,
     "expected numbers for FP32, got booleans"),
    ("a boolean among numbers", "gray", _one([1, 1, 8, 8], [0.5] * 63 + [False]), {}, 400,
     "expected numbers for FP32, got booleans"),
    ("nulls as FP32", "gray", _one([1, 1, 8, 8], [None] * 64), {}, 400, "got nulls"),
    ("arrays mixed with values", "gray", _one([1, 1, 8, 8], [[0.0] * 32, *[0.0] * 32]), {}, 400,
     "expected an array nested evenly to the shape"),
    ("numbers as BYTES", "gray", _one([1], [1], datatype="BYTES"), {}, 400,
     "expected strings for BYTES, got integers"),
    ("FP32 past its range", "gray", _one([1, 1, 8, 8], [1e39] * 64), {}, 400, "beyond FP32's range"),
    ("timeout past uint64", "gray", _one([1, 1, 8, 8], _ZEROS, parameters={"timeout": 2**64}), {}, 400,
     "parameters.timeout: expected an integer of microseconds in 0..2**64-1, got 1.8446744073709552e+19"),
    ("negative timeout", "gray", _one([1, 1, 8, 8], _ZEROS, parameters={"timeout": -1}), {}, 400,
     "parameters.timeout: expected an integer of microseconds"),
    ("fractional timeout", "gray", _one([1, 1, 8, 8], _ZEROS, parameters={"timeout": 1.5}), {}, 400,
     "parameters.timeout: expected an integer of microseconds"),
    ("string priority", "gray", _one([1, 1, 8, 8], _ZEROS, parameters={"priority": "high"}), {}, 400,
     "parameters.priority: expected an integer in 0..2**64-1, got 'high'"),
    ("binary_data_output not a boolean", "gray",
     _one([1, 1, 8, 8], _ZEROS, parameters={"binary_data_output": "yes"}), {}, 400,
     "parameters.binary_data_output: expected true or false, got 'yes'"),
    ("sequence_start not a boolean", "gray",
     _one([1, 1, 8, 8], _ZEROS, parameters={"sequence_start": 1}), {}, 400,
     "parameters.sequence_start: expected true or false, got 1"),
    ("header length past the body", "gray", b"{}", {HEADER_LENGTH: "99"}, 400,
     "Inference-Header-Content-Length: expected the JSON header's length in bytes, 0..2"),
    ("binary size past the data", "gray", _BINARY_256 + b"\0" * 10,
     {HEADER_LENGTH: str(len(_BINARY_256))}, 400, "claims 256 bytes, only 10 binary bytes remain"),
    ("bad classification", "gray", _one([1, 1, 8, 8], _ZEROS, parameters={"classification": "lots"}), {}, 400,
     "parameters.classification: expected an integer class count, got 'lots'"),
    ("unknown model", "nope", b'{"inputs": []}', {}, 404, "no model named 'nope'"),
    ("failed model", "mismatch", _one([1, 1, 8, 8], _ZEROS), {}, 503, "has no ready version"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_its_status_and_a_clear_message(
    rest: str, model_repository: Path, run_reference: Any, case: tuple[Any, ...]
) -> None:
    _, model, body, headers, status, fragment = case
    reply = call("POST", f"{rest}/v2/models/{model}/infer", body, headers)
    assert reply.status == status, reply.body
    assert fragment in reply.error, reply.error
    _assert_still_serving(rest, model_repository, run_reference)


def test_unknown_endpoint_and_wrong_method(rest: str) -> None:
    reply = get(f"{rest}/v3/whatever")
    assert reply.status == 404 and "no such endpoint: GET /v3/whatever" in reply.error
    wrong = get(f"{rest}/v2/models/gray/infer")
    assert wrong.status == 405 and "allowed: POST" in wrong.error


def test_body_over_the_limit_is_refused_before_it_is_read(
    server_factory: Any, model_repository: Path
) -> None:
    handle = server_factory(max_message_bytes=8192)
    rest = handle.http_url
    x = _batch(64, 8)  # 16 KiB of float32, about 60 KiB as JSON
    reply = post_json(f"{rest}/v2/models/gray/infer", {"inputs": [_json_input(x)]})
    assert reply.status == 413, reply.body
    assert "over the largest message this server accepts (8192 bytes" in reply.error
    small = post_json(f"{rest}/v2/models/gray/infer", {"inputs": [_json_input(_batch(1, 9))]})
    assert small.status == 200, small.body


def test_too_many_images_is_429(server_factory: Any) -> None:
    handle = server_factory(max_images_per_request=2)
    reply = post_json(f"{handle.http_url}/v2/models/gray/infer", {"inputs": [_json_input(_batch(3, 10))]})
    assert reply.status == 429 and "over the limit of 2" in reply.error


# ---- auth and drain -----------------------------------------------------------------------------------


def test_bearer_token_is_required_except_for_health_probes(server_factory: Any) -> None:
    handle = server_factory(auth_tokens=("s3cret",))
    rest = handle.http_url
    assert get(f"{rest}/v2/health/live").status == 200
    assert get(f"{rest}/v2/health/ready").status == 200
    body = {"inputs": [_json_input(_batch(1, 11))]}
    missing = post_json(f"{rest}/v2/models/gray/infer", body)
    assert missing.status == 401 and "Authorization: Bearer <token>" in missing.error
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = post_json(f"{rest}/v2/models/gray/infer", body, {"Authorization": "Bearer nope"})
    assert wrong.status == 401
    assert get(f"{rest}/v2/models/gray").status == 401
    ok = post_json(f"{rest}/v2/models/gray/infer", body, {"Authorization": "Bearer s3cret"})
    assert ok.status == 200, ok.body


def test_draining_reads_not_ready_and_refuses_new_work_with_503(server_factory: Any) -> None:
    handle = server_factory()
    rest = handle.http_url
    handle.call(handle.running.health.drain())
    assert get(f"{rest}/v2/health/live").status == 200
    # Not ready is the protocol's 4xx, with the readiness body KServe's client reads and the error's why.
    ready = get(f"{rest}/v2/health/ready")
    assert ready.status == 400 and ready.json()["ready"] is False and "shutting down" in ready.error
    assert ready.headers["Content-Type"].startswith("application/json")
    draining = get(f"{rest}/v2/models/gray/ready")
    assert draining.status == 400 and "shutting down" in draining.error
    refused = post_json(f"{rest}/v2/models/gray/infer", {"inputs": [_json_input(_batch(1, 12))]})
    assert refused.status == 503 and "shutting down" in refused.error


def test_rest_can_be_turned_off(server_factory: Any) -> None:
    handle = server_factory(http_port=-1)
    assert handle.http_port is None and handle.running.http is None


def test_rest_answers_before_models_load_and_reads_not_ready_until_then(server_factory: Any) -> None:
    handle = server_factory(load_models=False)
    rest = handle.http_url
    assert get(f"{rest}/v2/health/live").status == 200
    ready = get(f"{rest}/v2/health/ready")
    assert ready.status == 400 and ready.json()["ready"] is False
    assert "no model version is ready yet" in ready.error
    early = post_json(f"{rest}/v2/models/gray/infer", {"inputs": [_json_input(_batch(1, 13))]})
    assert early.status == 503 and "gray" in early.error
    handle.call(handle.running.load_models())
    assert get(f"{rest}/v2/health/ready").status == 200
    assert post_json(f"{rest}/v2/models/gray/infer", {"inputs": [_json_input(_batch(1, 13))]}).status == 200


def test_request_ids_come_back_exactly_and_a_too_long_one_is_refused_by_name(rest: str) -> None:
    """Clients match replies by the id they chose: any id within the bound comes back as sent; the
    ``x-request-id`` header (and the logs) keep the server's own sanitised token."""
    for rid in ("my request #1", "{3f2a}", "a b", "ünïcode ✓", "x" * 1024):
        reply = post_json(f"{rest}/v2/models/gray/infer", {"id": rid, "inputs": [_json_input(_batch(1, 14))]})
        assert reply.status == 200 and reply.json()["id"] == rid, reply.body[:200]
        assert reply.headers["x-request-id"] != rid and len(reply.headers["x-request-id"]) == 32
    body = {"id": "x" * 1025, "inputs": [_json_input(_batch(1, 14))]}
    refused = post_json(f"{rest}/v2/models/gray/infer", body)
    assert refused.status == 400 and refused.error == "id: expected at most 1024 characters, got 1025"


def _executions(rest: str, model: str) -> int:
    stats = get(f"{rest}/v2/models/{model}/stats").json()["model_stats"]
    return sum(int(s["execution_count"]) for s in stats)


def test_a_full_batcher_queue_is_429(server_factory: Any) -> None:
    """A request bigger than the queue flows through it one share at a time (fair admission: answered);
    single images that find the queue full while the slow model is busy are refused at once with 429."""
    handle = server_factory(max_queue_size=2)
    x = _batch(3, 15)  # three images never fit a queue bounded at two at once: they go one share at a time
    reply = post_json(f"{handle.http_url}/v2/models/gray/infer", {"inputs": [_json_input(x)]})
    assert reply.status == 200 and reply.json()["outputs"][0]["shape"] == [3, 4], reply.body
    slow = f"{handle.http_url}/v2/models/slow/infer"
    big = _batch(64, 16, (3, 48, 48))  # ~10 ms per image, one at a time: the model stays busy for ~0.6 s
    header = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": list(big.shape),
             "parameters": {"binary_data_size": big.nbytes}}
        ]
    }  # fmt: skip
    one = big[:1]
    single_header = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": list(one.shape),
             "parameters": {"binary_data_size": one.nbytes}}
        ]
    }  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(17) as pool:
        long_one = pool.submit(post_binary, slow, header, big.tobytes())
        # Fire the singles only once the long request is executing, so they surely meet a busy model and
        # a queue holding its next share (timing on a loaded box decides nothing).
        deadline = time.monotonic() + 30
        while _executions(handle.http_url, "slow") == 0:
            assert time.monotonic() < deadline and not long_one.done(), "the long request never started"
            time.sleep(0.002)
        # Binary tensors: the server spends next to nothing per single before queueing it, so they arrive
        # far faster than the model runs them (a JSON body costs ms to parse on a loaded box).
        singles = [pool.submit(post_binary, slow, single_header, one.tobytes()) for _ in range(16)]
        replies = [f.result(timeout=60) for f in singles]
        assert long_one.result(timeout=60).status == 200
    assert {r.status for r in replies} <= {200, 429}, [r.body for r in replies]
    refused = [r for r in replies if r.status == 429]
    assert refused and "queue" in refused[0].error, [r.status for r in replies]
    assert (
        post_json(f"{handle.http_url}/v2/models/gray/infer", {"inputs": [_json_input(x[:1])]}).status == 200
    )
