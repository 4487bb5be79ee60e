"""One ONNX Runtime session: provider choice with fallback, session options, and the graph-vs-config check."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from convserve.common.model_config import ModelConfig

from ..repository.model_files import STRICT, Boundary, check_graph
from ..settings import Settings

log = logging.getLogger(__name__)

# Our short provider names → ONNX Runtime's. Order of preference comes from the settings/config list.
ORT_PROVIDERS = {
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# One warning per process for each (requested, fallback) pair, not one per model version.
_warned: set[tuple[tuple[str, ...], str]] = set()
_warned_lock = threading.Lock()


class GraphMismatchError(ValueError):
    """The ONNX graph contradicts the model's config (names, shapes, class count)."""


@dataclass(frozen=True)
class SessionOptions:
    """The ONNX Runtime knobs the server exposes as settings."""

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization_level: str = "all"
    spin_during_runs: bool = False

    @classmethod
    def of(cls, settings: Settings) -> SessionOptions:
        """The options a served model's main session starts from (spinning is decided per model)."""
        return cls(settings.intra_op_threads, settings.inter_op_threads, settings.graph_optimization_level)


def inline_options(options: SessionOptions) -> SessionOptions:
    """The options of a cheap model's inline session: one thread each way, never spinning, because waking
    ONNX Runtime's intra-op threads costs more than such a model (measured: ~120 µs against ~40 µs for
    LeNet). The baselines take the same, so they run the model exactly as convserve does."""
    return dataclasses.replace(options, intra_op_threads=1, inter_op_threads=1, spin_during_runs=False)


def ort_options(options: SessionOptions) -> ort.SessionOptions:
    """``options`` as ONNX Runtime's SessionOptions: the one place that turns our knobs into its settings,
    shared by every session convserve creates and by the benchmark baselines."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = options.intra_op_threads
    opts.inter_op_num_threads = options.inter_op_threads
    opts.graph_optimization_level = _OPT_LEVELS[options.graph_optimization_level]
    # Threads that spin after a run would burn the cores the event loop needs between requests
    # (measured: ~25% more server CPU per LeNet request), so spinning, when on, stops as the last
    # concurrent run returns (docs/DESIGN.md, "ONNX Runtime threads").
    spin = "1" if options.spin_during_runs else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    opts.add_session_config_entry("session.force_spinning_stop", spin)
    opts.log_severity_level = 3  # ORT's own warnings are summarised by our one fallback warning
    return opts


def provider_list(requested: Sequence[str], available: Sequence[str] | None = None) -> list[str]:
    """Map short names to the ONNX Runtime providers to try, in order, dropping absent ones.

    ``cpu`` is always appended as the floor. Absent providers produce ONE warning per process naming
    what was asked for, what this onnxruntime build offers and what will be used instead.
    """
    available = list(ort.get_available_providers() if available is None else available)
    chosen: list[str] = []
    missing: list[str] = []
    for short in requested:
        name = ORT_PROVIDERS[short]
        if name in available:
            if name not in chosen:
                chosen.append(name)
        else:
            missing.append(short)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    if missing:
        _warn_once(
            tuple(requested),
            chosen[0],
            f"execution provider(s) {', '.join(missing)} requested but not available in this onnxruntime "
            f"build (available: {', '.join(available)}); falling back to {chosen[0]}. "
            f"Install the 'server-gpu' extra (onnxruntime-gpu in place of onnxruntime) on a machine "
            f"with CUDA for cuda/tensorrt.",
        )
    return chosen


def _warn_once(requested: tuple[str, ...], fallback: str, message: str) -> None:
    key = (requested, fallback)
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message)


class OnnxSession:
    """A loaded ONNX Runtime session checked against its config; ``run`` is thread-safe and synchronous.

    The batcher's worker threads call ``run``; only a cheap model's one-thread inline session runs on the
    event loop (``ServedModel.infer``).
    """

    def __init__(
        self,
        path: Path,
        cfg: ModelConfig,
        providers: Sequence[str],
        options: SessionOptions = SessionOptions(),
        boundary: Boundary = STRICT,
    ) -> None:
        self.path = Path(path)
        self.cfg = cfg
        self.options = options
        self.spinning = options.spin_during_runs
        opts = ort_options(options)
        wanted = provider_list(providers)
        # ONNX Runtime gets the graph's path, so external data resolves beside it (never against the
        # working directory), and only after every external-data reference was checked (model_files.py).
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: not a regular file")
        check_graph(self.path, self.path.read_bytes(), boundary)
        self._session = ort.InferenceSession(str(self.path), sess_options=opts, providers=wanted)
        active = self._session.get_providers()
        self.provider = active[0] if active else "CPUExecutionProvider"
        if self.provider != wanted[0]:
            # The library was present but the device was not (e.g. onnxruntime-gpu without a GPU).
            _warn_once(
                tuple(providers),
                self.provider,
                f"{wanted[0]} could not be initialised for {self.path}; running on {self.provider}",
            )
        self._check_graph()
        self._input = cfg.input.name
        self._outputs = [cfg.output.name]

    def _check_graph(self) -> None:
        """Raise GraphMismatchError when the graph's input/output names or shapes contradict the config."""
        cfg = self.cfg
        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        if len(inputs) != 1:
            raise GraphMismatchError(
                f"graph has {len(inputs)} inputs {[i.name for i in inputs]}; expected one"
            )
        inp = inputs[0]
        if inp.name != cfg.input.name:
            raise GraphMismatchError(f"graph input is named {inp.name!r}; config says {cfg.input.name!r}")
        if inp.type != "tensor(float)":
            raise GraphMismatchError(f"graph input type is {inp.type}; expected tensor(float)")
        shape = list(inp.shape)
        if len(shape) != 4:
            raise GraphMismatchError(f"graph input has rank {len(shape)} {shape}; expected [N, C, H, W]")
        for axis, (got, want) in enumerate(zip(shape[1:], cfg.input.shape, strict=True), start=1):
            if isinstance(got, int) and got != want:
                raise GraphMismatchError(
                    f"graph input dim {axis} is {got}; config input.shape says {want} "
                    f"(graph {shape}, config [N, {', '.join(map(str, cfg.input.shape))}])"
                )
        if isinstance(shape[0], int) and shape[0] != 1 and shape[0] < cfg.max_batch_size:
            raise GraphMismatchError(
                f"graph batch dimension is fixed at {shape[0]} but max_batch_size is "
                f"{cfg.max_batch_size}; export with a dynamic batch dimension"
            )
        if isinstance(shape[0], int) and shape[0] == 1 and cfg.max_batch_size != 1:
            raise GraphMismatchError(
                f"graph batch dimension is fixed at 1 but max_batch_size is "
                f"{cfg.max_batch_size}; export with a dynamic batch dimension"
            )
        names = [o.name for o in outputs]
        if cfg.output.name not in names:
            raise GraphMismatchError(
                f"graph outputs are {names}; config output.name {cfg.output.name!r} is not one"
            )
        # A probe run catches class-count mismatches even when the output dims are symbolic.
        probe = np.zeros((1, *cfg.input.shape), dtype=np.float32)
        out = self._session.run([cfg.output.name], {inp.name: probe})[0]
        if out.ndim != 2 or out.shape[1] != cfg.num_classes:
            raise GraphMismatchError(
                f"graph output {cfg.output.name!r} has shape {list(out.shape)} for one image; "
                f"config lists {cfg.num_classes} labels, so expected [1, {cfg.num_classes}]"
            )

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 → (N, K) float32 raw model output. Blocking; call from a worker thread."""
        return self._session.run(self._outputs, {self._input: batch})[0]
