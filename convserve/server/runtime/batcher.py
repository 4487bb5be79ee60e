"""Per-model dynamic batcher: one bounded queue, merged ONNX Runtime runs, deadlines and cancellation.

Requests are submitted from the asyncio event loop; ``instances`` worker threads take merged batches
from the queue, call the synchronous ``run`` (ONNX Runtime releases the GIL while it computes) and hand
each finished batch back to the loop with one ``call_soon_threadsafe``. So a batch costs one thread hop
each way, whatever the number of requests in it, and nothing ever sleeps or polls: an idle worker blocks
on a condition variable and a new request wakes it at once.

Semantics:

- The queue is bounded in **images**, not requests (memory grows with images): a request whose images
  would take the queued count past ``max_queue_size`` is refused at once with :class:`QueueFullError`.
  Images already taken by a worker no longer count.
- **Fair admission** (docs/DESIGN.md, "Admission"): no request holds more than a *share* of the queue
  (``max_queue_size // 4`` images, at least 1). A bigger request flows through one share at a time, each
  share waiting for room instead of failing (up to its deadline), so two huge requests cannot fill the queue
  and starve everyone else. Waiting requests are admitted in arrival order and only below
  ``max_queue_size - reserve`` (``reserve`` = ``max_queue_size // 4``): the top of the queue stays free for
  small requests that arrive to find room. Images waiting for room (streams aside) are bounded by
  ``max_queue_size`` too; past that a request is refused with :class:`QueueFullError`.
- **Fair between clients**: a request may name its ``client`` (the connection it came on). A client holds
  at most ``max_queue_size // (k + 1)`` images queued or running, ``k`` being the number of clients holding
  any now, itself included (half the queue when alone, a third each for two, ...): a request that fits one
  share and would take its client past that is refused with :class:`QueueFullError`, unless it is the
  client's only one. So one connection with many concurrent requests cannot fill the queue, and another
  client's request still finds room. Requests that wait for room (big ones, stream messages) count too.
- **Back-pressure** for streams: a message submitted with a :class:`Backpressure` valve waits for room
  instead of failing, and shuts the valve while it waits; the stream reads nothing more until it opens,
  so HTTP/2 flow control slows the client.
- A batch holds at most ``max_batch_size`` images. Multi-image requests count by images and may be split
  across runs; each caller gets exactly its own rows back, in order.
- ``max_queue_delay_us == 0`` (default): a free worker takes whatever is queued now and never waits.
  ``> 0``: a worker waits until the batch is full (or reaches the largest preferred size) or the oldest
  queued request has waited that long, whichever comes first.
- ``preferred_batch_sizes``: when several images are available, the batch is cut to the largest
  preferred size that fits; the rest stays queued for the next run. With none fitting, all available
  images (up to ``max_batch_size``) run.
- A request whose deadline passes while any of its images are still queued fails with
  :class:`DeadlineExpiredError`; its remaining images never run. A cancelled caller's queued images are
  removed the same way. Images already running finish; their rows are discarded.
- ``batching=False`` turns merging off: each request runs alone and whole, through the same queue.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from convserve.server.errors import (
    DeadlineExpiredError,
    DrainingError,
    InvalidInputError,
    QueueFullError,
)

__all__ = ["Backpressure", "BatchObserver", "Batcher", "BatchingPolicy"]

log = logging.getLogger(__name__)


class BatchObserver(Protocol):
    """Hooks for the metrics layer. Called from worker threads, except ``on_depth`` (either side)."""

    def on_batch(self, size: int, infer_seconds: float) -> None:
        """One ``run`` call finished: how many images it held and how long it took."""

    def on_dequeue(self, wait_seconds: float) -> None:
        """A request's first images left the queue after waiting this long."""

    def on_depth(self, depth: int) -> None:
        """The number of queued images changed."""


@dataclass(frozen=True, slots=True)
class BatchingPolicy:
    """How one model version batches: typed, frozen, and validated once, here (ValueError when wrong)."""

    max_batch_size: int
    enabled: bool = True
    max_queue_delay_us: int = 0
    max_queue_size: int = 1024
    preferred_batch_sizes: tuple[int, ...] = ()
    instances: int = 1

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {self.max_queue_size}")
        if self.instances < 1:
            raise ValueError(f"instances must be >= 1, got {self.instances}")
        bad = [p for p in self.preferred_batch_sizes if not 1 <= p <= self.max_batch_size]
        if bad:
            raise ValueError(f"preferred_batch_sizes must lie in 1..{self.max_batch_size}, got {bad}")
        object.__setattr__(self, "preferred_batch_sizes", tuple(sorted(set(self.preferred_batch_sizes))))


class _NoObserver:
    def on_batch(self, size: int, infer_seconds: float) -> None:
        pass

    def on_dequeue(self, wait_seconds: float) -> None:
        pass

    def on_depth(self, depth: int) -> None:
        pass


class _Request:
    """One caller's images, their progress through the queue, and the future that answers it."""

    __slots__ = (
        "deadline",
        "done",
        "dropped",
        "enqueued",
        "future",
        "loop",
        "n",
        "out",
        "taken",
        "timer",
        "x",
    )

    def __init__(
        self,
        x: np.ndarray,
        future: asyncio.Future,
        loop: asyncio.AbstractEventLoop,
        enqueued: float,
        deadline: float | None,
    ) -> None:
        self.x = x
        self.n = len(x)
        self.future = future
        self.loop = loop
        self.enqueued = enqueued
        self.deadline = deadline
        self.taken = 0  # images handed to workers so far
        self.done = 0  # images whose rows have come back
        self.dropped = False  # expired, cancelled or failed: the rest never runs
        self.out: np.ndarray | None = None
        self.timer: asyncio.TimerHandle | None = None


# (request, first image, image count) inside one batch
_Piece = tuple[_Request, int, int]


class Backpressure:
    """One stream's valve (event loop only). Its messages wait for room in a full queue instead of failing;
    while any of them waits the valve is shut, and the stream reads no further message until it opens."""

    __slots__ = ("_open", "_waiting")

    def __init__(self) -> None:
        self._waiting = 0
        self._open = asyncio.Event()
        self._open.set()

    @property
    def shut(self) -> bool:
        return self._waiting > 0

    async def wait_open(self) -> None:
        """Return once no message of this stream waits for room."""
        while self._waiting:
            await self._open.wait()

    def _enter(self) -> None:
        self._waiting += 1
        self._open.clear()

    def _leave(self) -> None:
        self._waiting -= 1
        if self._waiting == 0:
            self._open.set()


class _Waiter:
    """A request (or one share of a big one) waiting for room in the queue."""

    __slots__ = ("admitted", "backpressure", "future", "req")

    def __init__(self, req: _Request, future: asyncio.Future, backpressure: Backpressure | None) -> None:
        self.req = req
        self.future = future
        self.backpressure = backpressure
        self.admitted = False


class Batcher:
    """Merges concurrent requests for one model into batched calls of ``run``.

    ``run(batch)`` takes an (B, C, H, W) float32 array and returns (B, K) rows; it is called from
    ``instances`` threads at once, so it must be thread-safe (an ONNX Runtime session is).
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        policy: BatchingPolicy,
        *,
        observer: BatchObserver | None = None,
        name: str = "model",
    ) -> None:
        self.policy = policy
        max_batch_size, max_queue_delay_us = policy.max_batch_size, policy.max_queue_delay_us
        max_queue_size, instances, batching = policy.max_queue_size, policy.instances, policy.enabled
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_queue_delay_us = max_queue_delay_us
        self.max_queue_size = max_queue_size
        self.preferred_batch_sizes = policy.preferred_batch_sizes
        self.instances = instances
        self.batching = batching
        self.name = name
        self._delay = max_queue_delay_us / 1e6
        # With a delay, a worker stops waiting once this many images are queued.
        self._enough = self.preferred_batch_sizes[-1] if self.preferred_batch_sizes else max_batch_size
        self._observer: BatchObserver = observer or _NoObserver()
        # One lock guards the queue. Idle workers block on a C-level SimpleQueue of wake tokens
        # rather than a threading.Condition: measured ~30 µs less per request at one client.
        self._lock = threading.Lock()
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._waiting = 0  # workers blocked (or about to block) on _wake
        self._tokens = 0  # tokens in _wake not yet consumed
        self._wake_scheduled = False  # a _wake_worker callback is pending on the event loop
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued = 0  # images waiting, excluding dropped requests
        # Fair admission: the most images one request holds in the queue at once, and the top of the queue
        # that waiting requests leave to requests arriving to find room (module docstring).
        self.share = max(1, max_queue_size // 4)
        self.reserve = max_queue_size // 4
        self._waiters: collections.deque[_Waiter] = collections.deque()  # guarded by _lock
        self._waiting_images = 0  # images of waiters without a backpressure valve
        self._held: dict[Hashable, int] = {}  # images each client has queued, waiting or running (event loop)
        self._admit_posted = False  # an _admit_waiters callback is pending on the event loop
        self._threads: list[threading.Thread] = []
        self._started = False
        self._closing = False
        self._running_workers = 0
        self._all_exited: asyncio.Future | None = None
        self._active = 0  # batches being run right now (read without the lock: a hint, not a fact)

    # ------------------------------------------------------------------ lifecycle

    @property
    def depth(self) -> int:
        """Images waiting in the queue now."""
        return self._queued

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing running: a request now would run alone anyway (a hint)."""
        return self._queued == 0 and self._active == 0

    def start(self) -> None:
        """Start the worker threads; call once before the first submit."""
        if self._started:
            raise RuntimeError("batcher already started")
        self._started = True
        self._running_workers = self.instances
        for i in range(self.instances):
            t = threading.Thread(target=self._work, name=f"batcher-{self.name}-{i}", daemon=True)
            self._threads.append(t)
            t.start()

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new requests, let queued ones run for up to ``grace`` seconds (None: all of them),
        fail what is still queued after that with :class:`DrainingError`, and wait for running batches."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._all_exited is None:
                self._all_exited = loop.create_future()
                if self._running_workers == 0:
                    self._all_exited.set_result(None)
            exited = self._all_exited
            self._closing = True
            self._signal_locked(self.instances)
            waiters = list(self._waiters)
            self._waiters.clear()
            self._waiting_images = 0
        for w in waiters:
            if not w.future.done():
                w.future.set_exception(
                    DrainingError(f"model '{self.name}' is shutting down; request was waiting for room")
                )
        try:
            await asyncio.wait_for(asyncio.shield(exited), grace)
        except asyncio.TimeoutError:
            with self._lock:
                left = [r for r in self._queue if self._drop_locked(r)]
                self._queue.clear()
            self._observer.on_depth(0)
            err = DrainingError(f"model '{self.name}' is shutting down; request dropped from the queue")
            for req in left:
                self._post(req.loop, [req], err)
            await exited

    # ------------------------------------------------------------------ event-loop side

    async def submit(
        self,
        x: np.ndarray,
        deadline: float | None = None,
        backpressure: Backpressure | None = None,
        client: Hashable | None = None,
    ) -> np.ndarray:
        """Queue ``x`` (N, C, H, W) and return its (N, K) output rows, in order.

        ``deadline`` is an absolute ``time.monotonic()`` value. Raises QueueFullError when the queue
        is full, DeadlineExpiredError when the deadline passes before the images run, DrainingError
        after ``stop``; an exception from ``run`` is re-raised to every caller in that batch. A request
        bigger than ``share`` images, or one with a ``backpressure`` valve (a stream's message), waits for
        room instead of failing (fair admission, module docstring). ``client`` (None: anonymous) is who
        asks, for fairness between clients: QueueFullError when it already holds its share.
        """
        n = len(x)
        if n == 0:
            raise InvalidInputError("empty batch: expected at least one image, got 0")
        if self._closing:
            raise DrainingError(f"model '{self.name}' is shutting down")
        if not self._started:
            raise RuntimeError("Batcher.start() was not called")
        if n <= self.share:
            return await self._submit(x, deadline, backpressure, backpressure is not None, client)
        # One share at a time: this request never holds more than a share of the queue.
        parts = [
            await self._submit(x[i : i + self.share], deadline, backpressure, True, client)
            for i in range(0, n, self.share)
        ]
        return np.concatenate(parts)

    async def _submit(
        self,
        x: np.ndarray,
        deadline: float | None,
        backpressure: Backpressure | None,
        wait: bool,
        client: Hashable | None,
    ) -> np.ndarray:
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise DeadlineExpiredError(
                f"deadline passed {now - deadline:.6f} s before the request was queued; never ran"
            )
        loop = asyncio.get_running_loop()
        req = _Request(x, loop.create_future(), loop, now, deadline)
        n = req.n
        waiter: _Waiter | None = None
        wake = False
        with self._lock:
            if self._closing:
                raise DrainingError(f"model '{self.name}' is shutting down")
            if not wait:
                if self._queued + n > self.max_queue_size:
                    raise QueueFullError(
                        f"model '{self.name}' queue is full: {self._queued} images queued, limit "
                        f"{self.max_queue_size}, request has {n}"
                    )
                if client is not None:
                    self._check_client_share(client, n)
                wake = self._enqueue_locked(req)
            elif not self._waiters and self._queued + n <= self.max_queue_size - self.reserve:
                wake = self._enqueue_locked(req)
            else:
                if backpressure is None and self._waiting_images + n > self.max_queue_size:
                    raise QueueFullError(
                        f"model '{self.name}' queue is full: {self._queued} images queued and "
                        f"{self._waiting_images} waiting for room, limit {self.max_queue_size}, "
                        f"request has {n}"
                    )
                waiter = _Waiter(req, loop.create_future(), backpressure)
                self._waiters.append(waiter)
                if backpressure is None:
                    self._waiting_images += n
            depth = self._queued
        held = self._held
        if client is not None:
            held[client] = held.get(client, 0) + n
        try:
            if waiter is not None:
                await self._wait_for_room(waiter, loop)
            else:
                if wake:
                    # Wake an idle worker once per event-loop iteration, not per request: requests that
                    # arrive in the same iteration then share one batch and one thread wake-up. A wake-up
                    # costs the waker tens of µs on a VM (a cross-CPU interrupt), and the loop is the
                    # bottleneck under load. At one client this adds one loop step, a few µs.
                    loop.call_soon(self._wake_worker)
                self._observer.on_depth(depth)
            if deadline is not None:
                req.timer = loop.call_later(deadline - time.monotonic(), self._expire, req)
            try:
                return await req.future
            except asyncio.CancelledError:
                self._withdraw(req)
                raise
            finally:
                # A request withdrawn on cancel is never settled, and its deadline timer would keep it (its
                # images, the call's context) alive until the deadline: minutes for a typical client.
                if req.timer is not None:
                    req.timer.cancel()
        finally:
            if client is not None:
                left = held[client] - n
                if left:
                    held[client] = left
                else:
                    del held[client]

    def _check_client_share(self, client: Hashable, n: int) -> None:
        """Raise QueueFullError when ``client`` already holds images and ``n`` more would take it past its
        share of the queue: ``max_queue_size // (k + 1)``, ``k`` = clients holding images, itself included."""
        held = self._held.get(client, 0)
        if not held:
            return  # a client's only request is admitted whenever the queue has room
        clients = len(self._held)
        fair = max(1, self.max_queue_size // (clients + 1))
        if held + n > fair:
            raise QueueFullError(
                f"model '{self.name}' queue is full for this client: it holds {held} images queued or "
                f"running, its share is {fair} of {self.max_queue_size} with {clients} client(s) active, "
                f"request has {n}"
            )

    def _enqueue_locked(self, req: _Request) -> bool:
        """Put ``req`` in the queue (lock held); True when an idle worker should be woken."""
        self._queue.append(req)
        self._queued += req.n
        wake = self._tokens < self._waiting and not self._wake_scheduled
        if wake:
            self._wake_scheduled = True
        return wake

    async def _wait_for_room(self, waiter: _Waiter, loop: asyncio.AbstractEventLoop) -> None:
        """Wait until ``_admit_waiters`` queues the waiter's request; give up at its deadline."""
        req, valve = waiter.req, waiter.backpressure
        timer = None
        if req.deadline is not None:
            timer = loop.call_later(req.deadline - time.monotonic(), self._expire_waiter, waiter)
        if valve is not None:
            valve._enter()
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.admitted:
                self._withdraw(req)
            else:
                self._remove_waiter(waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if valve is not None:
                valve._leave()

    def _remove_waiter(self, waiter: _Waiter) -> None:
        with self._lock:
            if waiter.admitted or waiter not in self._waiters:
                return
            self._waiters.remove(waiter)
            if waiter.backpressure is None:
                self._waiting_images -= waiter.req.n
        self._admit_waiters()  # it may have been the head holding others back

    def _expire_waiter(self, waiter: _Waiter) -> None:
        """Deadline timer (event loop) of a request still waiting for room."""
        if waiter.admitted or waiter.future.done():
            return
        self._remove_waiter(waiter)
        waiter.future.set_exception(
            DeadlineExpiredError(
                f"deadline passed after {time.monotonic() - waiter.req.enqueued:.6f} s waiting for room "
                f"in model '{self.name}' queue ({self._queued} images queued, limit {self.max_queue_size}); "
                "never ran"
            )
        )

    def _admit_waiters(self) -> None:
        """Queue waiting requests, in arrival order, while they fit below the reserve (event loop)."""
        admitted: list[_Waiter] = []
        with self._lock:
            self._admit_posted = False
            limit = self.max_queue_size - self.reserve
            while self._waiters and not self._closing:
                w = self._waiters[0]
                if self._queued + w.req.n > limit:
                    break
                self._waiters.popleft()
                if w.backpressure is None:
                    self._waiting_images -= w.req.n
                w.admitted = True
                w.req.enqueued = time.monotonic()
                self._enqueue_locked(w.req)
                admitted.append(w)
            depth = self._queued
        if not admitted:
            return
        self._wake_worker()
        self._observer.on_depth(depth)
        for w in admitted:
            if not w.future.done():
                w.future.set_result(None)

    def _post_admit_locked(self) -> None:
        """Room was freed off the loop (lock held): let the loop admit waiters, once per pending call."""
        if self._waiters and not self._admit_posted:
            self._admit_posted = True
            with contextlib.suppress(RuntimeError):  # a closed loop has nobody waiting
                self._waiters[0].req.loop.call_soon_threadsafe(self._admit_waiters)

    def _wake_worker(self) -> None:
        with self._lock:
            self._wake_scheduled = False
            if self._queued > 0 and self._tokens < self._waiting:
                self._signal_locked(1)

    def _expire(self, req: _Request) -> None:
        """Deadline timer (event loop): drop the request if any of its images are still queued."""
        if self._withdraw(req) and not req.future.done():
            req.future.set_exception(
                DeadlineExpiredError(
                    f"deadline passed after {time.monotonic() - req.enqueued:.6f} s in the queue; "
                    f"{req.n - req.taken} of {req.n} images never ran"
                )
            )

    def _withdraw(self, req: _Request) -> bool:
        with self._lock:
            dropped = self._drop_locked(req)
            depth = self._queued
            waiting = bool(self._waiters)
        if dropped:
            self._observer.on_depth(depth)
            if waiting:
                self._admit_waiters()
        return dropped

    def _drop_locked(self, req: _Request) -> bool:
        """Mark a request's untaken images as gone. Lazy: the deque entry is skipped later."""
        if req.dropped or req.taken >= req.n:
            return False
        req.dropped = True
        self._queued -= req.n - req.taken
        return True

    @staticmethod
    def _settle(reqs: list[_Request], error: BaseException | None) -> None:
        """Answer finished requests (event loop); a future already answered (deadline) is left alone."""
        for req in reqs:
            if req.timer is not None:
                req.timer.cancel()
            fut = req.future
            if fut.done():
                continue
            if error is None:
                fut.set_result(req.out)
            else:
                fut.set_exception(error)

    def _post(
        self, loop: asyncio.AbstractEventLoop, reqs: list[_Request], error: BaseException | None
    ) -> None:
        """Answer requests on their event loop (any thread). A closed loop has nobody waiting."""
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._settle, reqs, error)

    # ------------------------------------------------------------------ worker side

    def _work(self) -> None:
        try:
            while True:
                with self._lock:
                    picked = self._next_batch_locked()
                    if picked is not None and picked[0]:
                        self._active += 1
                    if picked is not None and self._queued > 0 and self._tokens < self._waiting:
                        # Another worker is idle: let it take the rest while this one runs.
                        self._signal_locked(1)
                    depth = self._queued
                if picked is None:
                    return
                pieces, expired, now = picked
                obs = self._observer
                obs.on_depth(depth)
                for req in expired:
                    self._post(
                        req.loop,
                        [req],
                        DeadlineExpiredError(
                            f"deadline passed after {now - req.enqueued:.6f} s in the queue; never ran"
                        ),
                    )
                for req, start, _ in pieces:
                    if start == 0:
                        obs.on_dequeue(now - req.enqueued)
                if pieces:
                    self._run_batch(pieces)  # it lowers _active before answering
        finally:
            with self._lock:
                self._running_workers -= 1
                exited = self._all_exited if self._running_workers == 0 else None
            if exited is not None:
                with contextlib.suppress(RuntimeError):  # a closed loop has nobody waiting
                    exited.get_loop().call_soon_threadsafe(_set_if_pending, exited)

    def _next_batch_locked(self) -> tuple[list[_Piece], list[_Request], float] | None:
        """Wait for work and cut the next batch (lock held). None once closing and empty."""
        while True:
            q = self._queue
            while q and (q[0].dropped or q[0].taken >= q[0].n):
                q.popleft()
            if not q:
                if self._closing:
                    return None
                self._wait_locked(None)
                continue
            now = time.monotonic()
            if self._delay > 0 and self.batching and not self._closing and self._queued < self._enough:
                remaining = q[0].enqueued + self._delay - now
                if remaining > 0:
                    self._wait_locked(remaining)
                    continue
            return self._cut_locked(now)

    def _signal_locked(self, n: int) -> None:
        for _ in range(n):
            self._tokens += 1
            self._wake.put(None)

    def _wait_locked(self, timeout: float | None) -> None:
        """Release the lock until a wake token arrives or ``timeout`` passes; re-acquire it.

        A token left behind by a timed-out wait only causes one spurious wake-up later."""
        self._waiting += 1
        self._lock.release()
        try:
            self._wake.get(timeout=timeout)
            got = True
        except queue.Empty:
            got = False
        finally:
            self._lock.acquire()
            self._waiting -= 1
        if got:
            self._tokens -= 1

    def _cut_locked(self, now: float) -> tuple[list[_Piece], list[_Request], float]:
        """Take up to one batch from the head of the queue (lock held); drop expired requests."""
        size = min(self._queued, self.max_batch_size)
        pieces: list[_Piece] = []
        expired: list[_Request] = []
        got = 0
        for req in self._queue:
            if req.dropped or req.taken >= req.n:
                continue
            if req.taken == 0 and req.deadline is not None and req.deadline <= now:
                self._drop_locked(req)
                expired.append(req)
                continue
            if not self.batching:
                pieces.append((req, 0, req.n))
                got = req.n
                break
            k = min(req.n - req.taken, size - got)
            pieces.append((req, req.taken, k))
            got += k
            if got >= size:
                break
        if self.batching and self.preferred_batch_sizes and pieces:
            fitting = [p for p in self.preferred_batch_sizes if p <= got]
            if fitting and fitting[-1] < got:
                pieces = _trim(pieces, fitting[-1])
        for req, start, k in pieces:
            req.taken = start + k
            self._queued -= k
        self._post_admit_locked()
        return pieces, expired, now

    def _run_batch(self, pieces: list[_Piece]) -> None:
        """Run one batch (worker thread, lock not held) and hand the finished requests to their loops."""
        if len(pieces) == 1:
            req, start, k = pieces[0]
            batch = req.x if k == req.n else req.x[start : start + k]
        else:
            batch = np.concatenate([req.x[start : start + k] for req, start, k in pieces])
        size = len(batch)
        error: BaseException | None = None
        t0 = time.perf_counter()
        try:
            out = self._run(batch)
            if len(out) != size:
                raise RuntimeError(f"model returned {len(out)} rows for a batch of {size} images")
        except Exception as exc:  # every caller in the batch gets the model's error
            error = exc
            log.exception("model '%s' failed on a batch of %d images", self.name, size)
        self._observer.on_batch(size, time.perf_counter() - t0)

        finished: list[_Request] = []
        if error is not None:
            with self._lock:
                for req, _, _ in pieces:
                    self._drop_locked(req)
                    finished.append(req)
                self._post_admit_locked()
        else:
            row = 0
            partial = [p for p in pieces if p[2] != p[0].n]
            for req, _, k in pieces:
                if k == req.n:  # the whole request ran in this batch: its rows are a view
                    req.out = out[row : row + k]
                    finished.append(req)
                row += k
            if partial:
                # Pieces of one request may finish on different workers in any order.
                with self._lock:
                    row = 0
                    for req, start, k in pieces:
                        if k != req.n:
                            if req.out is None:
                                req.out = np.empty((req.n, *out.shape[1:]), dtype=out.dtype)
                            req.out[start : start + k] = out[row : row + k]
                            req.done += k
                            if req.done == req.n or req.dropped:
                                finished.append(req)
                        row += k
        # No longer running: a caller woken by the replies below must see the batcher idle (the inline path
        # of a cheap model checks it), or one batched request would pull every later one through here.
        with self._lock:
            self._active -= 1
        loop = finished[0].loop if finished else None
        if loop is not None and all(r.loop is loop for r in finished):
            self._post(loop, finished, error)
        else:
            for req in finished:
                self._post(req.loop, [req], error)


def _trim(pieces: list[_Piece], size: int) -> list[_Piece]:
    """Keep the first ``size`` images of a batch."""
    kept: list[_Piece] = []
    left = size
    for req, start, k in pieces:
        if left <= 0:
            break
        kept.append((req, start, min(k, left)))
        left -= k
    return kept


def _set_if_pending(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
