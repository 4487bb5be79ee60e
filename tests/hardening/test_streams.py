"""Streams against a server subprocess: a cancelled stream leaves nothing in flight, and a burst written
without a client-side window is slowed by HTTP/2 flow control, never failed with "queue is full".
"""

from __future__ import annotations

import signal
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc
from convserve.protos.inference import grpc_service_pb2 as v2pb
from convserve.protos.inference import grpc_service_pb2_grpc

SLOW = (1, 3, 48, 48)  # the "slow" model: ~5-10 ms per image, one instance, no batching
GRAY = (1, 1, 8, 8)


def classify_request(x: np.ndarray, model: str, rid: str = "") -> pb.ClassifyRequest:
    image = pb.Image(tensor=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=list(x.shape), data=x.tobytes()))
    return pb.ClassifyRequest(model=model, images=[image], top_k=4, request_id=rid)


def infer_request(x: np.ndarray, model: str, rid: str = "") -> v2pb.ModelInferRequest:
    request = v2pb.ModelInferRequest(model_name=model, id=rid)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def good_request_still_answered(address: str) -> None:
    x = np.zeros(GRAY, np.float32)
    with grpc.insecure_channel(address) as channel:
        reply = classifier_pb2_grpc.ClassifierStub(channel).Classify(classify_request(x, "gray"), timeout=20)
        assert len(reply.results[0].predictions) == 4
        reply = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            infer_request(x, "gray"), timeout=20
        )
        assert np.frombuffer(reply.raw_output_contents[0], "<f4").shape == (4,)


def test_cancelled_streams_leave_nothing_in_flight(spawn_server: Any, hardening_repository: Path) -> None:
    """Clients open ClassifyStream and ModelStreamInfer on the slow model, send more than the server can
    answer at once, read one reply (or none), cancel and disconnect. Nothing stays counted in flight: the
    idle server then drains within 2 s of SIGTERM, not after the 10 s grace period."""
    sp = spawn_server(hardening_repository, "--drain-grace-seconds", "10")
    x = np.random.default_rng(0).normal(size=SLOW).astype(np.float32)
    for read_first in (True, False):
        for api in ("classify", "v2"):
            channel = grpc.insecure_channel(sp.address)
            if api == "classify":
                call = classifier_pb2_grpc.ClassifierStub(channel).ClassifyStream(
                    iter([classify_request(x, "slow") for _ in range(40)])
                )
            else:
                call = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                    iter([infer_request(x, "slow") for _ in range(40)])
                )
            if read_first:
                next(call)
            else:
                time.sleep(0.2)  # the server has read messages and is working on them
            call.cancel()
            channel.close()
    good_request_still_answered(sp.address)
    t0 = time.monotonic()
    sp.proc.send_signal(signal.SIGTERM)
    code = sp.proc.wait(15)
    took = time.monotonic() - t0
    log = sp.log_text()
    assert code == 0, log[-3000:]
    assert "grace period over" not in log, log[-3000:]
    # The drain itself, from the server's own log: signal received → stopped. The process exit around it is
    # judged more loosely: interpreter teardown is CPU-bound and this machine is shared (load average ~8).
    stamps = {
        event: datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        for line in log.splitlines()
        for event in ("shutdown signal received", "stopped")
        if line.endswith(event)
    }
    drain = (stamps["stopped"] - stamps["shutdown signal received"]).total_seconds()
    assert drain < 2.0, f"the drain of an idle server took {drain:.2f} s: {log[-2000:]}"
    assert took < 5.0, f"SIGTERM on an idle server took {took:.2f} s to exit: {log[-2000:]}"


def _burst(
    address: str, api: str, model: str, messages: int, results: list[Any], lock: threading.Lock
) -> None:
    """One stream: every message written at once (no client-side window); collect replies in order."""
    x = np.random.default_rng(len(results)).normal(size=GRAY).astype(np.float32)
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        ids = [f"{api}-{threading.get_ident()}-{i}" for i in range(messages)]
        try:
            if api == "classify":
                replies = list(
                    classifier_pb2_grpc.ClassifierStub(channel).ClassifyStream(
                        iter([classify_request(x, model, rid) for rid in ids]), timeout=120
                    )
                )
                got = [
                    (r.request_id, r.error_code, r.error_message, len(r.response.results)) for r in replies
                ]
            else:
                replies = list(
                    grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                        iter([infer_request(x, model, rid) for rid in ids]), timeout=120
                    )
                )
                got = [
                    (r.infer_response.id, 0 if not r.error_message else -1, r.error_message,
                     len(r.infer_response.raw_output_contents))
                    for r in replies
                ]  # fmt: skip
            outcome: Any = (ids, got)
        except grpc.RpcError as err:
            outcome = (ids, err)
    with lock:
        results.append(outcome)


def test_unwindowed_stream_burst_is_flow_controlled_not_failed(
    spawn_server: Any, hardening_repository: Path
) -> None:
    """32 streams (both APIs) x 50 messages, each stream written whole before reading a reply, into a model
    queue of 16 images: every message answered, in order, none refused with RESOURCE_EXHAUSTED."""
    sp = spawn_server(hardening_repository, "--max-queue-size", "16")
    results: list[Any] = []
    lock = threading.Lock()
    threads = [
        threading.Thread(
            target=_burst, args=(sp.address, "classify" if i % 2 else "v2", "gray", 50, results, lock)
        )
        for i in range(32)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == 32
    failures: list[str] = []
    for ids, got in results:
        if isinstance(got, grpc.RpcError):
            failures.append(f"stream ended {got.code()}: {got.details()}")
            continue
        assert [g[0] for g in got] == ids, "replies missing or out of order"
        failures += [g[2] for g in got if g[1] != 0 or g[3] != 1]
    assert not failures, f"{len(failures)} of 1600 messages failed, e.g. {failures[:3]}"
    good_request_still_answered(sp.address)
