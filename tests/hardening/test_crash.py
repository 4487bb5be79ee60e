"""kill -9 of a server under load, then a restart on the same port: clients using the SDK's retries see only
correct answers or clean errors (ConvserveError subclasses), and no call outlives its deadline.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from convserve.client import Client, ConvserveError, RetryPolicy
from convserve.testing.waits import poll_until

TIMEOUT_S = 6.0  # each call's deadline, retries included
SLACK_S = 1.0  # scheduling slack on a busy 2-core machine
CLIENTS = 4


@dataclass
class Call:
    worker: int
    start: float
    end: float
    ok: bool
    correct: bool
    error: BaseException | None


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return buf.getvalue()


def _worker(
    address: str,
    worker: int,
    retry: RetryPolicy,
    pngs: list[bytes],
    expected: np.ndarray,
    calls: list[Call],
    stop: threading.Event,
    lock: threading.Lock,
) -> None:
    with Client(address, model="gray", timeout=TIMEOUT_S, retry=retry) as client:
        for n in range(10_000):  # bounded; `stop` ends it far earlier
            if stop.is_set():
                return
            i = (worker + n) % len(pngs)
            start = time.monotonic()
            try:
                result = client.classify(pngs[i], version=2, top_k=4)
                got = np.zeros(4)
                for p in result.predictions:
                    got[p.index] = p.probability
                call = Call(
                    worker,
                    start,
                    time.monotonic(),
                    True,
                    bool(np.allclose(got, expected[i], rtol=1e-4, atol=1e-6)),
                    None,
                )
            except ConvserveError as exc:  # a clean, typed error; anything else propagates and fails the test
                call = Call(worker, start, time.monotonic(), False, False, exc)
            with lock:
                calls.append(call)


def test_kill_9_and_restart_under_load(
    spawn_server: Any, hardening_repository: Path, run_reference: Any
) -> None:
    first = spawn_server(hardening_repository)
    port = first.grpc_port
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 8), dtype=np.uint8)
    pngs = [_png(p) for p in pixels]
    x = ((pixels.astype(np.float32) / 255 - 0.5) / 0.25)[:, None]
    expected = softmax(run_reference(hardening_repository / "gray" / "2" / "model.onnx", x))

    # Half the clients use the SDK's default retries; half a patient policy that outlasts a restart.
    patient = RetryPolicy(max_attempts=100, max_backoff_s=0.5, budget_s=TIMEOUT_S)
    calls: list[Call] = []
    lock = threading.Lock()
    stop = threading.Event()
    failures: list[BaseException] = []

    def run(worker: int) -> None:
        try:
            _worker(
                first.address,
                worker,
                RetryPolicy() if worker % 2 else patient,
                pngs,
                expected,
                calls,
                stop,
                lock,
            )
        except BaseException as exc:  # surfaced below: an unclean error type fails the test
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        assert poll_until(lambda: sum(c.ok for c in calls) >= 100, 30), "load never got going"
        first.proc.kill()  # SIGKILL: no drain, connections reset mid-call
        first.proc.wait(10)
        t_kill = time.monotonic()

        second = None
        for _attempt in range(20):  # the port may need a moment before it can be bound again
            try:
                second = spawn_server(hardening_repository, grpc_port=port)
                break
            except RuntimeError:
                time.sleep(0.25)
        assert second is not None, "could not restart the server on the same port"
        assert second.grpc_port == port
        t_up = time.monotonic()
        assert poll_until(
            lambda: all(
                sum(c.ok and c.start > t_up for c in calls if c.worker == w) >= 20 for w in range(CLIENTS)
            ),
            30,
        ), "clients did not recover"
    finally:
        stop.set()
        for t in threads:
            t.join(TIMEOUT_S + 10)
    assert not failures, failures
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert all(c.correct for c in calls if c.ok), "a wrong answer"
    # Nobody waited past their deadline, whatever happened to the server.
    longest = max(c.end - c.start for c in calls)
    assert longest <= TIMEOUT_S + SLACK_S, longest
    errors = [c for c in calls if not c.ok]
    assert all(
        type(c.error).__name__ in ("ServerUnavailableError", "DeadlineExceededError") for c in errors
    ), {type(c.error).__name__: str(c.error) for c in errors}
    # Calls that straddled the crash: the patient clients rode through it on retries.
    straddled = [c for c in calls if c.start < t_kill < c.end]
    assert straddled, "no call was in flight across the crash"
    patient_across = [c for c in calls if c.worker % 2 == 0 and c.start < t_up and c.end > t_kill]
    assert patient_across and all(c.ok for c in patient_across), [str(c.error) for c in patient_across]
    assert second.stop() == 0
    kinds = ", ".join(sorted({type(c.error).__name__ for c in errors})) or "none"
    print(f"\ncrash: {len(calls)} SDK calls, {sum(c.ok for c in calls)} correct answers,", end=" ")
    print(f"{len(errors)} clean errors ({kinds}), {len(straddled)} in flight at kill -9,", end=" ")
    print(f"longest call {longest:.2f} s (deadline {TIMEOUT_S} s), downtime {t_up - t_kill:.2f} s")
