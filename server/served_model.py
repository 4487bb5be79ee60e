"""One served model version: its state, ONNX Runtime session and batcher; ``await infer(batch, deadline)``."""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .batcher import Batcher
from .errors import DeadlineExpiredError, ModelNotReadyError
from .metrics import Metrics
from .model_check import warm_up
from .model_config import ModelConfig
from .session import OnnxSession, SessionOptions
from .settings import Settings

log = logging.getLogger(__name__)


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


class _BatchMetrics:
    """Adapts the batcher's observer hooks to the metrics layer's pre-resolved per-version recorders."""

    __slots__ = ("_obs",)

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self._obs = metrics.observer(model, version)

    def on_batch(self, size: int, infer_seconds: float) -> None:
        self._obs.observe_batch(size)

    def on_dequeue(self, wait_seconds: float) -> None:
        self._obs.observe_queue_wait(wait_seconds)

    def on_depth(self, depth: int) -> None:
        self._obs.set_queue_depth(depth)


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
        self.state = ModelState.LOADING
        self.reason = ""
        self.provider = ""
        self.session: OnnxSession | None = None
        self.batcher: Batcher | None = None
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

    @property
    def batching(self) -> dict[str, object]:
        """Effective batching settings: the model's config over the server-wide defaults."""
        b, s = self.cfg.batching, self.settings
        return {
            "enabled": b.enabled,
            "max_batch_size": self.cfg.max_batch_size,
            "max_queue_delay_us": s.max_queue_delay_us
            if b.max_queue_delay_us is None
            else b.max_queue_delay_us,
            "max_queue_size": s.max_queue_size if b.max_queue_size is None else b.max_queue_size,
            "preferred_batch_sizes": tuple(b.preferred_batch_sizes),
            "instances": s.instances if b.instances is None else b.instances,
        }

    def load(self) -> None:
        """Create the session and batcher (blocking). On failure the version is FAILED with the reason."""
        s = self.settings
        try:
            session = OnnxSession(
                self.path,
                self.cfg,
                self.providers,
                SessionOptions(s.intra_op_threads, s.inter_op_threads, s.graph_optimization_level),
            )
            warm_up(session.run, self.cfg)  # serves only after real batches give [N, classes] finite values
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
        b = self.batching
        self.batcher = Batcher(
            self._timed_run(session),
            max_batch_size=int(b["max_batch_size"]),  # type: ignore[arg-type]
            max_queue_delay_us=int(b["max_queue_delay_us"]),  # type: ignore[arg-type]
            max_queue_size=int(b["max_queue_size"]),  # type: ignore[arg-type]
            preferred_batch_sizes=b["preferred_batch_sizes"],  # type: ignore[arg-type]
            instances=int(b["instances"]),  # type: ignore[arg-type]
            observer=_BatchMetrics(self.metrics, self.name, self.version_label),
            batching=bool(b["enabled"]),
            name=self.name,
        )
        self.batcher.start()
        self._move(ModelState.READY)
        log.info(
            "model %s version %s ready on %s (batching %s)",
            self.name,
            self.version,
            self.provider,
            "on" if b["enabled"] else "off",
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

    def _timed_run(self, session: OnnxSession) -> Callable[[np.ndarray], np.ndarray]:
        stage, name, version = self.metrics.stage, self.name, self.version_label

        def run(batch: np.ndarray) -> np.ndarray:
            with stage("inference", name, version):
                return session.run(batch)

        return run

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

    async def infer(self, batch: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """(N, C, H, W) float32 → (N, K) raw outputs, run off the event loop by the batcher.

        ``deadline`` is absolute ``time.monotonic()`` seconds; a request past it is never run.
        Raises ModelNotReadyError, QueueFullError, DeadlineExpiredError, DrainingError.
        """
        if self.state is not ModelState.READY or self.batcher is None:
            raise ModelNotReadyError(
                f"model {self.name!r} version {self.version} is {self.state.value}"
                + (f": {self.reason}" if self.reason else "")
            )
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExpiredError(
                f"deadline passed before model {self.name!r} version {self.version} "
                "could run the request; never ran"
            )
        return await self.batcher.submit(batch, deadline)
