"""One served model version: its state, ONNX Runtime session and batcher; ``await infer(batch, deadline)``."""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from convserve.common.model_config import ModelConfig

from ..errors import DeadlineExpiredError, ModelNotReadyError
from ..observability.metrics import Metrics
from ..observability.stats import ModelStats
from ..repository.model_check import warm_up
from ..repository.model_files import Boundary
from ..settings import Settings
from . import core_share
from .batcher import Backpressure, Batcher, BatchingPolicy
from .session import OnnxSession, SessionOptions, inline_options

log = logging.getLogger(__name__)

# An inline-run estimate above the bound but within REPROBE_FACTOR times it is re-measured inline once per
# REPROBE_EVERY single-image requests: the load-time probe of a 45 µs model measured 169 µs on a busy box
# and, never re-measured, sent every request through the batcher (+120 µs of CPU each). A model estimated
# further above the bound never runs on the loop; a re-probe costs the loop at most that factor x the bound.
REPROBE_FACTOR = 4
REPROBE_EVERY = 32
# The inline estimate is the fastest run (wall time) of the last INLINE_WINDOW inline runs or of those since:
# what a run costs when nothing else interferes. A mean (it was an average of thread CPU time) follows the
# box's load instead: a busy box's preemption and cache misses pushed LeNet's from ~45 µs to ~200 µs, over
# the bound, and every single image then paid the batcher's thread hop. A model that really got slower
# moves its estimate up after one window of slow runs.
INLINE_WINDOW = 32
# A model whose one-image run takes longer than this (wall time, on its worker's share of the threads) runs
# on every core under the workers' core share (core_share.py); the lock's syscalls are noise next to it.
EXPENSIVE_RUN_S = 0.001
# When cheap single images leave the loop for the batcher (``LoopLoad``): the loop thread's CPU share over a
# LOOP_WINDOW_S window (measured: C=1 ~0.6 inline; C=32 ~0.9 inline, ~0.75 through the batcher).
LOOP_WINDOW_S = 0.02
LOOP_BUSY_ABOVE = 0.8
LOOP_IDLE_BELOW = 0.5
LOOP_BACKOFF_S = 0.2


class LoopLoad:
    """Whether single images should leave the event loop for the batcher although they are cheap.

    Inline runs serialise every request on the loop and keep the batcher idle, so requests arriving back
    to back never see it busy and never merge: at C=32 the loop saturated at ~1.8k req/s inline against
    ~2.4k through the batcher (docs/performance.md). A loop on CPU more than ``LOOP_BUSY_ABOVE`` of a
    window (its thread CPU time over wall time) starts offloading; offloading continues while requests
    overlap in the batcher (there is concurrency to merge) and the loop stays above ``LOOP_IDLE_BELOW``.
    A serial client also keeps the loop busy but gains nothing from the batcher: a window with no overlap
    goes back to inline and offloading is not tried again for ``LOOP_BACKOFF_S``. Read on the loop only.
    """

    __slots__ = ("_backoff_until", "_cpu", "_overlap", "_start", "offloading")

    def __init__(self) -> None:
        self._start = 0.0
        self._cpu = 0.0
        self._overlap = False
        self._backoff_until = 0.0
        self.offloading = False

    def overlapped(self) -> None:
        """A request went to the batcher while another one of this model was still waiting there."""
        self._overlap = True

    def offload(self, now: float, thread_cpu: Callable[[], float]) -> bool:
        """``now``: a monotonic clock (s); ``thread_cpu`` reads this thread's CPU time (s), called at
        most once per ``LOOP_WINDOW_S`` (it is a system call)."""
        if now - self._start >= LOOP_WINDOW_S:
            cpu = thread_cpu()
            share = (cpu - self._cpu) / (now - self._start)
            if self.offloading:
                if not self._overlap:
                    self.offloading = False
                    self._backoff_until = now + LOOP_BACKOFF_S
                elif share < LOOP_IDLE_BELOW:
                    self.offloading = False
            elif share > LOOP_BUSY_ABOVE and now >= self._backoff_until:
                self.offloading = True
            self._start, self._cpu, self._overlap = now, cpu, False
        return self.offloading


class ModelState(enum.Enum):
    """A version's lifecycle: loading → ready | failed; ready → unloading. Nothing goes back to loading."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"


_ALLOWED = {
    ModelState.LOADING: {ModelState.READY, ModelState.FAILED, ModelState.UNLOADING},
    ModelState.READY: {ModelState.UNLOADING},
    ModelState.FAILED: {ModelState.UNLOADING},
    ModelState.UNLOADING: set(),
}

StateListener = Callable[["ServedModel"], None]


class ServedModel:
    """A model version as the services see it: ``load()`` blocks (run it in a thread); ``infer`` does not."""

    def __init__(
        self,
        name: str,
        version: int,
        path: Path,
        cfg: ModelConfig,
        settings: Settings,
        metrics: Metrics,
        on_state: StateListener | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.version_label = str(version)
        self.path = path
        self.cfg = cfg
        self.settings = settings
        self.metrics = metrics
        self.boundary = Boundary(settings.allow_external_symlinks, Path(settings.model_repository))
        self.state = ModelState.LOADING
        self.reason = ""
        self.provider = ""
        self.session: OnnxSession | None = None
        self.batcher: Batcher | None = None
        # The one recorder of this version: Triton-style counters and its Prometheus children (a version on
        # disk is a legitimate label value from the start).
        metrics.register_model(name, self.version_label)
        self.stats = ModelStats(metrics, name, self.version_label)
        # Runs estimated to cost at most this long execute on the caller's thread (the event loop) when
        # the batcher is idle: a thread hop each way costs more than such a run (docs/DESIGN.md).
        self.inline_max_s = settings.inline_inference_us / 1e6
        self.inline_session: OnnxSession | None = None
        self.lone_session: OnnxSession | None = None  # a cheap model's spinning session for lone runs
        self.core_share: core_share.CoreShare | None = None  # set when this version's runs take every core
        self.inline_run_s = 0.0  # estimated duration of one inline run (INLINE_WINDOW)
        self._window_min = float("inf")  # fastest inline run of the current window
        self._window_runs = 0
        self.loop_load = LoopLoad()
        self.offload_busy_loop = settings.offload_busy_loop
        # The inference core's output plans for this version (server/core/inference.py), freed with it.
        self.plans: dict[tuple[object, ...], tuple[tuple[object, ...], int]] = {}
        self._pending = 0  # requests of this version waiting on the batcher
        self._reprobe = 0  # single-image requests sent to the batcher while the estimate was near the bound
        self._on_state = on_state
        self._notify()

    # ---- lifecycle -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY

    @property
    def providers(self) -> tuple[str, ...]:
        """The ordered provider preference: the model's own list, else the server-wide one."""
        return self.cfg.execution_providers or self.settings.execution_providers

    @functools.cached_property
    def batching(self) -> BatchingPolicy:
        """Effective batching policy: the model's config over the server-wide defaults, validated once."""
        b, s = self.cfg.batching, self.settings
        return BatchingPolicy(
            max_batch_size=self.cfg.max_batch_size,
            enabled=b.enabled,
            max_queue_delay_us=s.max_queue_delay_us if b.max_queue_delay_us is None else b.max_queue_delay_us,
            max_queue_size=s.max_queue_size if b.max_queue_size is None else b.max_queue_size,
            preferred_batch_sizes=tuple(b.preferred_batch_sizes),
            instances=s.instances if b.instances is None else b.instances,
        )

    def load(self) -> None:
        """Create the session and batcher (blocking). On failure the version is FAILED with the reason."""
        s = self.settings
        options = SessionOptions.of(s)
        try:
            session = OnnxSession(self.path, self.cfg, self.providers, options, self.boundary)
            warm_up(session.run, self.cfg)  # serves only after real batches give [N, classes] finite values
            cpu_s, wall_s = _median_run_s(session, self.cfg)  # one probe for the decisions below
            share = core_share.current()
            if (
                share is not None
                and wall_s > EXPENSIVE_RUN_S
                and session.provider == "CPUExecutionProvider"
                and share.cores > options.intra_op_threads
            ):
                # A worker's split of the threads would halve an expensive model's runs: it takes every
                # core instead, one run at a time across the workers (core_share.py).
                options = dataclasses.replace(options, intra_op_threads=share.cores)
                session = OnnxSession(self.path, self.cfg, self.providers, options, self.boundary)
                warm_up(session.run, self.cfg)
                self.core_share = share
            if _spins(s, session) and s.spin_above_us < 1e6 * wall_s:
                # An expensive model's runs hand work between operators faster with spinning threads
                # (ResNet-18, C=1: +13% img/s); a cheap one's would take the loop's core (docs/DESIGN.md).
                session = self._spinning_session(options)
        except Exception as exc:  # any load problem is a reason to report, not a crash
            if self.state is not ModelState.LOADING:
                return
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._fail(f"{type(exc).__name__}: {reason}")
            return
        if self.state is not ModelState.LOADING:  # unloaded (shutdown) while the session was being built
            return
        self.session = session
        self.provider = session.provider
        policy = self.batching
        if self.inline_max_s > 0 and cpu_s <= REPROBE_FACTOR * self.inline_max_s:
            # A cheap model also gets a one-thread session for the inline path: waking ONNX Runtime's
            # intra-op threads costs more than such a model (measured: ~120 µs against ~40 µs for LeNet).
            try:
                self.inline_session = OnnxSession(
                    self.path, self.cfg, self.providers, inline_options(options), self.boundary
                )
                # A fresh session's first runs are slow (allocation, caches): warm it before timing.
                self.inline_run_s = _fastest_run_s(self.inline_session, self.cfg, runs=15, warm=10)
            except Exception:  # the batcher path still serves; inline is only an optimisation
                log.exception("model %s version %s: no inline session", self.name, self.version)
                self.inline_session = None
        if self.inline_session is not None and not session.spinning and _spins(s, session):
            try:
                self.lone_session = self._spinning_session(options)
            except Exception:  # the sleeping session still serves
                log.exception("model %s version %s: no spinning session", self.name, self.version)
                self.lone_session = None
        self.batcher = Batcher(self._run_batch, policy, observer=self.stats, name=self.name)
        self.batcher.start()
        self._move(ModelState.READY)
        log.info(
            "model %s version %s ready on %s (batching %s; %s; inline single-image runs %s)",
            self.name,
            self.version,
            self.provider,
            "on" if policy.enabled else "off",
            "threads spin during runs" if session.spinning else "threads sleep between operators",
            f"estimated at {self.inline_run_s * 1e6:.0f} µs" if self.inline_session is not None else "off",
            extra={
                "fields": {
                    "event": "model_ready",
                    "model": self.name,
                    "version": self.version_label,
                    "provider": self.provider,
                    "path": str(self.path),
                }
            },
        )

    def _spinning_session(self, options: SessionOptions) -> OnnxSession:
        """A warmed-up session whose intra-op threads spin during runs and stop as each run ends."""
        session = OnnxSession(
            self.path, self.cfg, self.providers, dataclasses.replace(options, spin_during_runs=True),
            self.boundary,
        )
        warm_up(session.run, self.cfg)
        return session

    def _fail(self, reason: str) -> None:
        self.reason = reason
        self._move(ModelState.FAILED)
        log.error(
            "model %s version %s failed to load: %s",
            self.name,
            self.version,
            reason,
            extra={
                "fields": {
                    "event": "model_failed",
                    "model": self.name,
                    "version": self.version_label,
                    "reason": reason,
                }
            },
        )

    def fail(self, reason: str) -> None:
        """Mark a version that cannot load (e.g. its model file is missing) as FAILED."""
        self._fail(reason)

    async def unload(self, grace: float | None = None) -> None:
        """Stop taking requests; queued ones get up to ``grace`` seconds; then release the batcher."""
        if self.state is ModelState.UNLOADING:
            return
        self._move(ModelState.UNLOADING)
        if self.batcher is not None:
            await self.batcher.stop(grace)
        self.release()

    def release(self) -> None:
        """Drop the sessions and the batcher now rather than when the last reference goes: the batcher's
        bound ``_run_batch`` makes a reference cycle, and versions loaded at start are frozen out of the
        cyclic GC (``gc.freeze``), so an unloaded version would keep its ONNX Runtime thread pools and
        arenas for the process's life. Only after ``unload``: a request still holding this object sees
        UNLOADING and is refused."""
        self.batcher = None
        self.session = self.inline_session = self.lone_session = None
        self.plans.clear()

    def _move(self, state: ModelState) -> None:
        if state not in _ALLOWED[self.state]:
            raise RuntimeError(
                f"model {self.name} v{self.version}: cannot go from {self.state.value} to {state.value}"
            )
        self.state = state
        self._notify()

    def listen(self, on_state: StateListener) -> None:
        """Report state changes to ``on_state`` from now on, starting with the current state. Hot reload
        loads a replacement silently and attaches the listener once it actually serves."""
        self._on_state = on_state
        self._notify()

    def _notify(self) -> None:
        if self._on_state is not None:
            self._on_state(self)

    # ---- serving ---------------------------------------------------------------------------------

    async def infer(
        self,
        batch: np.ndarray,
        deadline: float | None = None,
        backpressure: Backpressure | None = None,
        client: str = "",
    ) -> np.ndarray:
        """(N, C, H, W) float32 → (N, K) raw outputs: inline when one run is cheaper than a thread hop,
        the batcher is idle and the loop has time to spare, else through the batcher (off the loop).

        ``deadline`` is absolute ``time.monotonic()`` seconds; a request past it is never run. With a
        stream's ``backpressure`` valve a full queue makes the request wait for room (``Batcher.submit``).
        ``client`` (the peer; "" = anonymous) is the key of fair admission between clients.
        Raises ModelNotReadyError, QueueFullError, DeadlineExpiredError, DrainingError.
        """
        batcher = self.batcher
        if self.state is not ModelState.READY or batcher is None:
            raise ModelNotReadyError(
                f"model {self.name!r} version {self.version} is {self.state.value}"
                + (f": {self.reason}" if self.reason else "")
            )
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExpiredError(
                f"deadline passed before model {self.name!r} version {self.version} "
                "could run the request; never ran"
            )
        inline = self.inline_session
        if inline is not None and len(batch) == 1 and batcher.idle and self._inline_now():
            t0 = time.perf_counter()
            if not (self.offload_busy_loop and self.loop_load.offload(t0, time.thread_time)):
                out = inline.run(batch)
                took = time.perf_counter() - t0
                self._inline_ran(took)
                self.stats.on_batch(1, took)
                return out
        self._pending += 1
        if self._pending > 1:
            self.loop_load.overlapped()
        try:
            return await batcher.submit(batch, deadline, backpressure, client or None)
        finally:
            self._pending -= 1

    def _run_batch(self, batch: np.ndarray) -> np.ndarray:
        """The batcher's run. A cheap model's batch spins its threads when its estimated cost exceeds
        ``spin_above_us`` and no other request of this version waits: then no event-loop work competes for
        the cores (docs/DESIGN.md, "ONNX Runtime threads")."""
        lone = self.lone_session
        if (
            lone is not None
            and self._pending <= 1
            and len(batch) * self.inline_run_s * 1e6 > self.settings.spin_above_us
        ):
            return lone.run(batch)
        session = self.session
        assert session is not None
        if self.core_share is not None:
            with self.core_share.held():
                return session.run(batch)
        return session.run(batch)

    def _inline_ran(self, seconds: float) -> None:
        """Fold one inline run's wall time into the estimate (INLINE_WINDOW): it drops at once to a faster
        run and rises only to the fastest run of a whole window."""
        if seconds < self._window_min:
            self._window_min = seconds
        self._window_runs += 1
        if self._window_runs >= INLINE_WINDOW:
            self.inline_run_s = self._window_min
            self._window_min = float("inf")
            self._window_runs = 0
        elif seconds < self.inline_run_s:
            self.inline_run_s = seconds

    def _inline_now(self) -> bool:
        """Whether a single image runs inline: its estimated cost is within the bound; or, for an estimate
        near the bound (a probe slowed by a busy machine), every ``REPROBE_EVERY``-th chance, so that the
        estimate can come back down instead of staying stuck above the bound for the process's life."""
        if self.inline_run_s <= self.inline_max_s:
            return True
        if self.inline_run_s > REPROBE_FACTOR * self.inline_max_s:
            return False
        self._reprobe += 1
        return self._reprobe % REPROBE_EVERY == 0


def _spins(settings: Settings, session: OnnxSession) -> bool:
    """Whether spinning threads may serve this version at all: not when turned off, and not on a GPU,
    where the intra-op threads would spin through every kernel the device runs."""
    return settings.spin_above_us >= 0 and session.provider == "CPUExecutionProvider"


def _fastest_run_s(session: OnnxSession, cfg: ModelConfig, runs: int, warm: int) -> float:
    """The fastest of ``runs`` single-image runs (wall time) after ``warm`` untimed ones: the inline
    estimate's start, robust to a busy machine slowing some of them."""
    probe = np.zeros((1, *cfg.input.shape), dtype=np.float32)
    for _ in range(warm):
        session.run(probe)
    fastest = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(probe)
        fastest = min(fastest, time.perf_counter() - t0)
    return fastest


def _median_run_s(
    session: OnnxSession, cfg: ModelConfig, runs: int = 7, warm: int = 0
) -> tuple[float, float]:
    """Medians of ``runs`` single-image runs after ``warm`` untimed ones, as (this thread's CPU, wall time):
    the cost estimates the inline and spinning decisions start from. Thread CPU is what a one-thread run
    costs, preemption excluded; a multi-thread run's length needs wall time."""
    probe = np.zeros((1, *cfg.input.shape), dtype=np.float32)
    for _ in range(warm):
        session.run(probe)
    cpu, wall = [], []
    for _ in range(runs):
        c0, t0 = time.thread_time(), time.perf_counter()
        session.run(probe)
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - t0)
    return sorted(cpu)[len(cpu) // 2], sorted(wall)[len(wall) // 2]
