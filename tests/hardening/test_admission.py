"""Fair admission against a server subprocess: requests as big as the whole model queue do not starve other
clients. Two clients send queue-sized requests back to back while a third sends single images: every call
of all three is answered (the big ones wait for room in shares of the queue instead of failing), and the
answers are right.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc

QUEUE = 64  # --max-queue-size: one big request would fill it whole
SHAPE = (1, 32, 32)
RUN_S = 3.0


@pytest.fixture(scope="module")
def mid_repository(tmp_path_factory: pytest.TempPathFactory, model_writer: Any) -> Path:
    """``mid``: batching on, ~1 ms per image on one core, so a 64-image request stays queued for a while."""
    repo = tmp_path_factory.mktemp("admission_repository")
    model_writer(repo, "mid", {1: {"seed": 5, "filters": 16, "depth": 2}}, size=32, max_batch_size=16)
    return repo


def _client(
    address: str, x: np.ndarray, expected: np.ndarray, t_end: float, out: list[Any], lock: threading.Lock
) -> None:
    image = pb.Image(tensor=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=list(x.shape), data=x.tobytes()))
    request = pb.ClassifyRequest(model="mid", images=[image], top_k=4)
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        for _ in range(2000):  # bounded; t_end ends it far earlier
            if time.monotonic() >= t_end:
                return
            try:
                reply = stub.Classify(request, timeout=30)
                got = np.zeros((len(reply.results), 4))
                for row, result in enumerate(reply.results):
                    for p in result.predictions:
                        got[row, p.index] = p.probability
                outcome: Any = ("OK", bool(np.allclose(got, expected, atol=1e-5)))
            except grpc.RpcError as err:
                outcome = (err.code().name, err.details())
            with lock:
                out.append(outcome)
            if len(x) == 1:
                time.sleep(0.01)


def test_big_requests_do_not_starve_small_ones(
    spawn_server: Any, mid_repository: Path, run_reference: Any
) -> None:
    sp = spawn_server(
        mid_repository, "--max-queue-size", str(QUEUE), "--max-images-per-request", str(QUEUE)
    )
    rng = np.random.default_rng(3)
    big = rng.normal(size=(QUEUE, *SHAPE)).astype(np.float32)
    small = rng.normal(size=(1, *SHAPE)).astype(np.float32)
    logits = run_reference(mid_repository / "mid" / "1" / "model.onnx", np.concatenate([big, small]))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = e / e.sum(axis=1, keepdims=True)
    results: dict[str, list[Any]] = {"big-1": [], "big-2": [], "small": []}
    lock = threading.Lock()
    t_end = time.monotonic() + RUN_S
    jobs = [("big-1", big, probs[:QUEUE]), ("big-2", big, probs[:QUEUE]), ("small", small, probs[QUEUE:])]
    threads = [
        threading.Thread(target=_client, args=(sp.address, x, want, t_end, results[name], lock))
        for name, x, want in jobs
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    summary = {name: [o for o in got if o != ("OK", True)][:3] for name, got in results.items()}
    assert all(len(got) >= 3 for got in results.values()), {k: len(v) for k, v in results.items()}
    for name, got in results.items():
        assert all(o == ("OK", True) for o in got), f"{name}: {summary}"
    print(f"\nadmission: {', '.join(f'{k} {len(v)} calls' for k, v in results.items())}, all answered right")


def test_one_client_with_many_requests_does_not_starve_another(
    spawn_server: Any, mid_repository: Path, run_reference: Any
) -> None:
    """One client (one channel) keeps 32 quarter-queue requests in flight at once; another client, on its
    own channel, sends single images meanwhile: every one of the second client's calls is answered right.
    The first client's surplus is refused RESOURCE_EXHAUSTED (its share of the queue is full), never more."""
    sp = spawn_server(mid_repository, "--max-queue-size", str(QUEUE))
    quarter = QUEUE // 4
    rng = np.random.default_rng(4)
    x = rng.normal(size=(quarter, *SHAPE)).astype(np.float32)
    small = rng.normal(size=(1, *SHAPE)).astype(np.float32)
    logits = run_reference(mid_repository / "mid" / "1" / "model.onnx", np.concatenate([x, small]))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = e / e.sum(axis=1, keepdims=True)
    greedy: list[Any] = []
    polite: list[Any] = []
    lock = threading.Lock()
    t_end = time.monotonic() + RUN_S
    started = threading.Event()

    def flood() -> None:
        image = pb.Image(tensor=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=list(x.shape), data=x.tobytes()))
        request = pb.ClassifyRequest(model="mid", images=[image], top_k=4)
        with grpc.insecure_channel(sp.address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            for _ in range(500):  # bounded; t_end ends it far earlier
                if time.monotonic() >= t_end:
                    return
                calls = [stub.Classify.future(request, timeout=30) for _ in range(32)]
                started.set()
                for call in calls:
                    try:
                        reply = call.result()
                        got = np.zeros((len(reply.results), 4))
                        for row, result in enumerate(reply.results):
                            for p in result.predictions:
                                got[row, p.index] = p.probability
                        outcome: Any = ("OK", bool(np.allclose(got, probs[:quarter], atol=1e-5)))
                    except grpc.RpcError as err:
                        outcome = (err.code().name, err.details())
                    with lock:
                        greedy.append(outcome)

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        assert started.wait(30), "the flooding client never started"
        _client(sp.address, small, probs[quarter:], t_end, polite, lock)
    finally:
        flooder.join(60)
    assert len(polite) >= 20, len(polite)
    bad = [o for o in polite if o != ("OK", True)]
    assert not bad, f"{len(bad)} of {len(polite)} single-image calls failed: {bad[:3]}"
    ok = [o for o in greedy if o[0] == "OK"]
    assert ok and all(o[1] for o in ok), "the flooding client got no right answer"
    refused = [o for o in greedy if o[0] != "OK"]
    assert all(o[0] == "RESOURCE_EXHAUSTED" and "queue is full" in o[1] for o in refused), refused[:3]
    print(
        f"\nper-client admission: flooding client {len(ok)} answered, {len(refused)} refused; "
        f"single-image client {len(polite)} calls, all answered right"
    )
