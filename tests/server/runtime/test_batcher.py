"""The dynamic batcher: merged runs return each caller exactly its own rows; queue bound, deadlines,
cancellation, delay, preferred sizes and parallel instances behave as documented.

Workers are held with events inside ``run`` (never sleeps) so the queue's contents are known when a
batch is cut.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from convserve.server.errors import DeadlineExpiredError, DrainingError, InvalidInputError, QueueFullError
from convserve.server.runtime.batcher import Batcher, BatchingPolicy

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0  # seconds: upper bound on any wait in these tests, never reached when things work


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    """A tiny real ONNX model: (N, 1, 4, 4) → flatten → linear → (N, 3) logits."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_run(sess: ort.InferenceSession):
    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {"input": x})[0]
    return run


def ids(first: int, n: int) -> np.ndarray:
    """n images whose pixels all equal their id, so a row can be traced back to its image."""
    return np.repeat(np.arange(first, first + n, dtype=np.float32), 16).reshape(n, 1, 4, 4)


def id_rows(x: np.ndarray) -> np.ndarray:
    """A numpy model: each image's id, twice, as its output row."""
    col = x[:, 0, 0, :1]
    return np.concatenate([col, col], axis=1)


class Gate:
    """Wraps ``run``: records every batch; the first call blocks until ``open()``."""

    def __init__(self, run=id_rows) -> None:
        self.inner = run
        self.entered = threading.Event()
        self.released = threading.Event()
        self.batches: list[np.ndarray] = []
        self._lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            self.batches.append(x.copy())
            first = len(self.batches) == 1
        if first:
            self.entered.set()
            if not self.released.wait(WAIT):
                raise TimeoutError("gate never opened")
        return self.inner(x)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, WAIT), "worker never picked up the first batch"

    def open(self) -> None:
        self.released.set()

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]

    def seen_ids(self) -> set[int]:
        return {int(v) for b in self.batches for v in b[:, 0, 0, 0]}


class Recorder:
    """A BatchObserver that keeps everything it is told."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.waits: list[float] = []
        self.depths: list[int] = []

    def on_batch(self, size: int, infer_seconds: float) -> None:
        self.batches.append(size)

    def on_dequeue(self, wait_seconds: float) -> None:
        self.waits.append(wait_seconds)

    def on_depth(self, depth: int) -> None:
        self.depths.append(depth)


async def until_queued(batcher: Batcher, images: int) -> None:
    """Let submitted tasks reach the queue (each needs one loop step); bounded."""
    for _ in range(1000):
        if batcher.depth >= images:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"queue holds {batcher.depth} images, expected {images}")


async def held(gate: Gate, policy: BatchingPolicy) -> tuple[Batcher, asyncio.Task]:
    """A started batcher whose worker is inside ``gate`` with one image (id 0): what is submitted next
    queues behind it until the gate opens."""
    b = Batcher(gate, policy)
    b.start()
    running = asyncio.create_task(b.submit(ids(0, 1)))
    await gate.wait_entered()
    return b, running


def run_async(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_concurrent_callers_each_get_their_own_unbatched_result(session):
    gate = Gate(ort_run(session))
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((1, 1, 4, 4)).astype(np.float32) for _ in range(40)]

    async def main():
        b = Batcher(gate, BatchingPolicy(max_batch_size=16))
        b.start()
        first = asyncio.create_task(b.submit(inputs[0]))
        await gate.wait_entered()
        rest = [asyncio.create_task(b.submit(x)) for x in inputs[1:]]
        await until_queued(b, len(rest))
        gate.open()
        out = [await first, *await asyncio.gather(*rest)]
        await b.stop()
        return out

    outputs = run_async(main())
    for x, y in zip(inputs, outputs, strict=True):
        expected = session.run(None, {"input": x})[0]
        assert y.shape == (1, 3)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    assert gate.sizes == [1, 16, 16, 7]  # merged, never over max_batch_size


def test_multi_image_requests_split_across_runs_come_back_in_order():
    gate = Gate()
    sizes = [1, 7, 3, 5, 1]
    starts = np.cumsum([0, *sizes[:-1]])

    async def main():
        b = Batcher(gate, BatchingPolicy(max_batch_size=4))
        b.start()
        first = asyncio.create_task(b.submit(ids(0, 1)))
        await gate.wait_entered()
        tasks = [asyncio.create_task(b.submit(ids(int(s), n)))
                 for s, n in zip(starts[1:], sizes[1:], strict=True)]
        await until_queued(b, sum(sizes[1:]))
        gate.open()
        out = [await first, *await asyncio.gather(*tasks)]
        await b.stop()
        return out

    outputs = run_async(main())
    for s, n, y in zip(starts, sizes, outputs, strict=True):
        np.testing.assert_array_equal(y[:, 0], np.arange(s, s + n, dtype=np.float32))
    assert gate.sizes == [1, 4, 4, 4, 4]
    # the 7-image request ran in two pieces, across two batches
    assert gate.batches[1][:, 0, 0, 0].tolist() == [1, 2, 3, 4]
    assert gate.batches[2][:, 0, 0, 0].tolist() == [5, 6, 7, 8]


def test_split_request_finishes_correctly_across_parallel_instances(session):
    x = np.random.default_rng(2).standard_normal((50, 1, 4, 4)).astype(np.float32)

    async def main():
        b = Batcher(ort_run(session), BatchingPolicy(max_batch_size=8, instances=3))
        b.start()
        out = await b.submit(x)
        await b.stop()
        return out

    np.testing.assert_allclose(run_async(main()), session.run(None, {"input": x})[0], rtol=1e-5, atol=1e-6)


def test_queue_bound_counts_images_and_refuses_at_once():
    gate = Gate()

    async def main():
        # The held image is taken by the worker: it no longer counts against the queue.
        b, running = await held(gate, BatchingPolicy(max_batch_size=8, max_queue_size=16))
        queued = [asyncio.create_task(b.submit(ids(1 + 4 * i, 4))) for i in range(4)]  # 4 shares of 4
        await until_queued(b, 16)
        t0 = time.perf_counter()
        with pytest.raises(QueueFullError, match="16 images queued, limit 16, request has 1"):
            await b.submit(ids(17, 1))
        refused_in = time.perf_counter() - t0
        gate.open()
        await asyncio.gather(running, *queued)
        await b.submit(ids(18, 4))  # room again once drained
        await b.stop()
        return refused_in

    assert run_async(main()) < 0.5
    assert 17 not in gate.seen_ids()


def test_one_client_holds_at_most_its_share_and_another_still_gets_in():
    """Client "a" alone may hold half the 16-image queue (its first request always gets in); with "b" active
    too, a third; "b", holding nothing, is admitted while "a" is refused; what "a" holds frees as it runs."""
    gate = Gate()

    async def main():
        b = Batcher(gate, BatchingPolicy(max_batch_size=8, max_queue_size=16))
        b.start()
        running = asyncio.create_task(b.submit(ids(0, 1), client="a"))  # a holds 1 (running)
        await gate.wait_entered()
        held = [asyncio.create_task(b.submit(ids(1, 4), client="a"))]
        await until_queued(b, 4)  # a holds 5
        more = asyncio.create_task(b.submit(ids(5, 3), client="a"))  # 8: half the queue, alone
        await until_queued(b, 7)
        with pytest.raises(QueueFullError, match=r"full for this client: it holds 8 .* share is 8 of 16"):
            await b.submit(ids(100, 1), client="a")
        other = asyncio.create_task(b.submit(ids(8, 4), client="b"))  # b holds nothing: admitted
        await until_queued(b, 11)
        with pytest.raises(QueueFullError, match="share is 5 of 16 with 2 client"):
            await b.submit(ids(101, 1), client="a")
        anonymous = asyncio.create_task(b.submit(ids(12, 4)))  # no client: only the queue bound applies
        await until_queued(b, 15)
        gate.open()
        await asyncio.gather(running, *held, more, other, anonymous)
        assert b._held == {}  # everything released once answered
        await b.submit(ids(16, 4), client="a")
        await b.stop()

    run_async(main())
    assert {100, 101}.isdisjoint(gate.seen_ids())


def test_big_requests_hold_one_share_and_leave_room_for_small_ones():
    """Two requests as big as the whole queue flow through one share (8 // 4 = 2 images) at a time instead
    of filling it: small requests arriving meanwhile are queued, not refused, and everyone gets its rows."""
    gate = Gate()

    async def main():
        b, running = await held(gate, BatchingPolicy(max_batch_size=2, max_queue_size=8))
        big = [asyncio.create_task(b.submit(ids(100, 8))), asyncio.create_task(b.submit(ids(200, 8)))]
        await until_queued(b, 4)
        small = [asyncio.create_task(b.submit(ids(10 + i, 1))) for i in range(4)]
        await until_queued(b, 8)
        assert b.depth == 8  # 2 shares + 4 small requests: nothing refused
        gate.open()
        return await asyncio.gather(running, *big, *small)

    outs = run_async(main())
    assert outs[1][:, 0].tolist() == list(range(100, 108))
    assert outs[2][:, 0].tolist() == list(range(200, 208))
    assert [o[0, 0] for o in outs[3:]] == [10, 11, 12, 13]


def test_request_waiting_for_room_fails_at_its_deadline_and_never_runs():
    gate = Gate()

    async def main():
        b, running = await held(gate, BatchingPolicy(max_batch_size=8, max_queue_size=8))
        queued = [asyncio.create_task(b.submit(ids(1 + 2 * i, 2))) for i in range(4)]
        await until_queued(b, 8)
        with pytest.raises(DeadlineExpiredError, match="waiting for room"):
            await b.submit(ids(50, 4), deadline=time.monotonic() + 0.05)  # bigger than a share: waits
        gate.open()
        await asyncio.gather(running, *queued)
        await b.stop()

    run_async(main())
    assert 50 not in gate.seen_ids()


def test_backpressure_valve_shuts_while_a_stream_message_waits_for_room():
    from convserve.server.runtime.batcher import Backpressure

    gate = Gate()

    async def main():
        # Waiting requests stay below 4 - 1.
        b, running = await held(gate, BatchingPolicy(max_batch_size=8, max_queue_size=4))
        queued = [asyncio.create_task(b.submit(ids(1 + i, 1))) for i in range(3)]
        await until_queued(b, 3)
        valve = Backpressure()
        waiting = asyncio.create_task(b.submit(ids(9, 1), backpressure=valve))
        for _ in range(100):
            await asyncio.sleep(0)
        assert valve.shut and not waiting.done()  # a full queue: the message waits, it is not refused
        gate.open()
        await asyncio.wait_for(valve.wait_open(), WAIT)
        out = await waiting
        await asyncio.gather(running, *queued)
        await b.stop()
        return out

    assert run_async(main())[0, 0] == 9


def test_deadline_passing_in_queue_fails_request_and_it_never_runs():
    gate = Gate()

    async def main():
        b, running = await held(gate, BatchingPolicy(max_batch_size=8))
        doomed = asyncio.create_task(b.submit(ids(1, 2), deadline=time.monotonic() + 0.05))
        keeper = asyncio.create_task(b.submit(ids(3, 1), deadline=time.monotonic() + WAIT))
        with pytest.raises(DeadlineExpiredError, match="2 of 2 images never ran"):
            await doomed
        assert b.depth == 1
        gate.open()
        await running
        kept = await keeper
        with pytest.raises(DeadlineExpiredError, match="before the request was queued"):
            await b.submit(ids(9, 1), deadline=time.monotonic() - 1)
        await b.stop()
        return kept

    assert run_async(main())[:, 0].tolist() == [3]
    assert gate.seen_ids() == {0, 3}


def test_cancelled_caller_is_removed_and_never_runs():
    gate = Gate()

    async def main():
        b, running = await held(gate, BatchingPolicy(max_batch_size=8))
        victim = asyncio.create_task(b.submit(ids(1, 3)))
        other = asyncio.create_task(b.submit(ids(4, 1)))
        await until_queued(b, 4)
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        assert b.depth == 1
        gate.open()
        await asyncio.gather(running, other)
        await b.stop()

    run_async(main())
    assert gate.seen_ids() == {0, 4}
    assert gate.sizes == [1, 1]


def test_cancelled_caller_with_a_deadline_is_released_at_once_not_at_its_deadline():
    """A queued request withdrawn on cancel is never settled by a worker, so nothing cancelled its deadline
    timer, which kept the request (its images, the call's context) alive until the deadline: with a
    30 s client deadline, ~2 KB per cancelled stream message built up in a soak."""
    import gc
    import weakref

    gate = Gate()
    refs: list[weakref.ref] = []

    async def main():
        b, running = await held(gate, BatchingPolicy(max_batch_size=8))
        x = ids(1, 3)
        refs.append(weakref.ref(x))
        victim = asyncio.create_task(b.submit(x, deadline=time.monotonic() + 3600))
        del x
        await until_queued(b, 3)
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        del victim
        gate.open()
        await running
        await b.submit(ids(4, 1))  # the worker has cut past the withdrawn entry: the queue no longer holds it
        gc.collect()
        assert refs[0]() is None, "the cancelled request's images are still held (by its deadline timer)"
        await b.stop()

    run_async(main())
    assert gate.seen_ids() == {0, 4}


def test_one_client_gets_batches_of_one_without_waiting(session):
    rec = Recorder()
    x = np.ones((1, 1, 4, 4), np.float32)

    async def main():
        b = Batcher(ort_run(session), BatchingPolicy(max_batch_size=64), observer=rec)
        b.start()
        for _ in range(200):
            await b.submit(x)
        await b.stop()

    run_async(main())
    assert rec.batches == [1] * 200
    assert len(rec.waits) == 200
    # The wait is only the thread wake-up (tens of µs); a timed wait would show up as the median.
    assert float(np.median(rec.waits)) < 0.005


def test_queue_delay_merges_requests_that_arrive_within_it():
    gate = Gate(id_rows)
    gate.open()

    async def main():
        b = Batcher(gate, BatchingPolicy(max_batch_size=8, max_queue_delay_us=200_000))
        b.start()
        out = await asyncio.gather(*(b.submit(ids(i, 1)) for i in range(3)))
        # A full batch goes at once, long before a 100 s delay.
        slow = Batcher(gate, BatchingPolicy(max_batch_size=4, max_queue_delay_us=100_000_000))
        slow.start()
        t0 = time.perf_counter()
        await asyncio.gather(*(slow.submit(ids(10 + i, 1)) for i in range(4)))
        full_after = time.perf_counter() - t0
        await b.stop()
        await slow.stop()
        return out, full_after

    out, full_after = run_async(main())
    assert [y[0, 0] for y in out] == [0, 1, 2]
    assert gate.sizes == [3, 4]
    assert full_after < 5


def test_preferred_batch_sizes_cut_the_queue():
    gate = Gate()

    async def main():
        b, running = await held(gate, BatchingPolicy(max_batch_size=8, preferred_batch_sizes=(2, 4)))
        tasks = [asyncio.create_task(b.submit(ids(i, 1))) for i in range(1, 8)]
        await until_queued(b, 7)
        gate.open()
        out = await asyncio.gather(running, *tasks)
        await b.stop()
        return out

    out = run_async(main())
    assert [int(y[0, 0]) for y in out] == list(range(8))
    assert gate.sizes == [1, 4, 2, 1]


def test_instances_run_concurrently():
    both_inside = threading.Barrier(2, timeout=WAIT)

    def run(x: np.ndarray) -> np.ndarray:
        both_inside.wait()  # breaks (and fails the test) unless two runs overlap
        return id_rows(x)

    async def main():
        b = Batcher(run, BatchingPolicy(max_batch_size=1, instances=2))
        b.start()
        out = await asyncio.gather(b.submit(ids(0, 1)), b.submit(ids(1, 1)))
        await b.stop()
        return out

    assert [y[0, 0] for y in run_async(main())] == [0, 1]


def test_batching_off_runs_each_request_alone_and_whole():
    gate = Gate()

    async def main():
        b, running = await held(gate, BatchingPolicy(max_batch_size=4, enabled=False))
        tasks = [asyncio.create_task(b.submit(ids(1, 2))), asyncio.create_task(b.submit(ids(3, 1)))]
        await until_queued(b, 3)
        gate.open()
        await asyncio.gather(running, *tasks)
        await b.stop()

    run_async(main())
    assert gate.sizes == [1, 2, 1]


def test_model_error_reaches_every_caller_in_the_batch_and_batcher_keeps_serving():
    calls = []

    def run(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        if len(calls) == 1:
            raise ValueError("boom")
        return id_rows(x)

    async def main():
        b = Batcher(run, BatchingPolicy(max_batch_size=8))
        b.start()
        with pytest.raises(ValueError, match="boom"):
            await b.submit(ids(0, 2))
        ok = await b.submit(ids(5, 1))
        await b.stop()
        return ok

    assert run_async(main())[0, 0] == 5


def test_stop_drains_then_refuses_and_grace_zero_drops_the_queue():
    gate = Gate()

    async def main():
        b, running = await held(gate, BatchingPolicy(max_batch_size=8))
        queued = asyncio.create_task(b.submit(ids(1, 1)))
        await until_queued(b, 1)
        stopping = asyncio.create_task(b.stop(grace=0))
        with pytest.raises(DrainingError, match="dropped from the queue"):
            await queued
        gate.open()
        await running  # the running batch finishes
        await stopping
        with pytest.raises(DrainingError):
            await b.submit(ids(2, 1))

        drained = Batcher(id_rows, BatchingPolicy(max_batch_size=8))
        drained.start()
        pending = [asyncio.create_task(drained.submit(ids(i, 1))) for i in range(5)]
        await asyncio.sleep(0)  # one loop step: every task has queued (or run) its request
        await drained.stop()  # grace None: everything queued still runs
        return [int((await p)[0, 0]) for p in pending]

    assert run_async(main()) == [0, 1, 2, 3, 4]


def test_empty_request_and_bad_settings_are_refused():
    async def main():
        b = Batcher(id_rows, BatchingPolicy(max_batch_size=4))
        b.start()
        with pytest.raises(InvalidInputError, match="empty batch"):
            await b.submit(np.zeros((0, 1, 4, 4), np.float32))
        await b.stop()

    run_async(main())
    with pytest.raises(ValueError, match="preferred_batch_sizes"):
        Batcher(id_rows, BatchingPolicy(max_batch_size=4, preferred_batch_sizes=(8,)))
    with pytest.raises(ValueError, match="instances"):
        Batcher(id_rows, BatchingPolicy(max_batch_size=4, instances=0))
