"""``convserve quantize``: a float version → an int8 version of the same model, written only when it
answers as the float model does (the accuracy gate) and runs faster on this machine (the speed gate).

The scheme was picked by measurement on an AVX2 CPU without VNNI (docs/DESIGN.md, "Quantized models"):
static QDQ, int8 per-channel weights with ``reduce_range`` (7-bit weights keep ONNX Runtime's u8×s8
kernels from saturating and select its fast path there), uint8 activations calibrated by min/max.
Nothing is written until both gates pass (or ``force``) and the server's own loader has run the graph;
then the version appears atomically beside the float one (common/model_entry.py).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from convserve.common.model_config import (
    MODEL_FILE,
    ModelConfig,
    ModelConfigError,
    QuantizedVersion,
    load_config,
)
from convserve.common.model_entry import EntryWriteError, check_writable, next_version, write_entry

from . import data as datamod
from . import evaluate

CALIBRATION_IMAGES = 128  # enough to see each class of a small label set several times; min/max needs no more
MAX_ACCURACY_DROP = 0.005  # top-1, as a fraction (0.5 points)
MIN_AGREEMENT = 0.99  # top-1 agreement of int8 with float on the held-out images
SPEED_BATCHES = (1, 32)
SPEED_ROUNDS = 5  # interleaved float/int8 rounds; the median of each side is compared
SPEED_ROUND_SECONDS = 0.2  # each side runs at least this long per round
SPEED_THREADS = 2  # intra-op threads: the reference set-up, and what a 2-core box has
COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
METHOD = "static QDQ, int8 per-channel weights (reduce_range), uint8 activations, min/max calibration"

log = logging.getLogger(__name__)


class QuantizeError(RuntimeError):
    """The model cannot be quantized as asked; nothing was written. The message says why in one line."""


@dataclass(frozen=True)
class Gate:
    """Float vs int8 on the held-out images, and their speed; ``passed`` says whether the version may be
    written without ``force``."""

    data: str
    images: int
    labelled: bool
    float_accuracy: float | None
    int8_accuracy: float | None
    agreement: float
    speed: dict[int, tuple[float, float]]  # batch → (float img/s, int8 img/s)
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class QuantizeResult:
    model: str
    from_version: int
    version: int  # the version written, or the one it would have been
    written: bool
    calibration: str
    float_nodes: tuple[str, ...]
    gate: Gate
    attempts: tuple[str, ...] = ()


def quantize_model_dir(model_dir: Path, *, calibration: Path | None = None, eval_dir: Path | None = None,
                       from_version: int | None = None, force: bool = False) -> QuantizeResult:
    """Quantize ``model_dir``'s float version (default: its highest version not itself quantized) and write
    it as the next version when the gates pass or ``force``. Raises QuantizeError (nothing written)."""
    model_dir = Path(model_dir)
    try:
        cfg = load_config(model_dir)
    except ModelConfigError as exc:
        raise QuantizeError(str(exc)) from None
    quantized = {q.version for q in cfg.quantized}
    source_version, source = _source(model_dir, from_version, quantized)
    try:
        calib_x, calib_text = _calibration_inputs(cfg, calibration)
        gate_x, gate_truth, gate_text = _gate_inputs(cfg, eval_dir, calib_x, calib_text)
    except datamod.DataError as exc:
        raise QuantizeError(str(exc)) from None
    float_bytes = source.read_bytes()
    float_out = _predict(float_bytes, cfg, gate_x)

    # First everything; when that fails the accuracy gate, keep the first and last compute nodes float:
    # the first sees raw pixels (few channels, one range for very different values) and the last decides
    # the argmax, so these two are where int8 error costs most.
    attempts: list[str] = []
    first_last = _first_last_compute(float_bytes)
    for exclude in ((), first_last) if first_last else ((),):
        int8_bytes = quantize_graph(float_bytes, cfg.input.name, calib_x, exclude)
        int8_out = _predict(int8_bytes, cfg, gate_x)
        accuracy_failures = _accuracy_failures(float_out, int8_out, gate_truth)
        attempts.append("all compute nodes int8" if not exclude else f"kept float: {', '.join(exclude)}")
        if not accuracy_failures:
            break
    speed = _speed(float_bytes, int8_bytes, cfg)
    failures = accuracy_failures + _speed_failures(speed)
    gate = Gate(
        data=gate_text, images=len(gate_x), labelled=gate_truth is not None,
        float_accuracy=_accuracy(float_out, gate_truth), int8_accuracy=_accuracy(int8_out, gate_truth),
        agreement=float(np.mean(float_out == int8_out)), speed=speed, failures=tuple(failures))
    float_nodes = float_compute_nodes(int8_bytes)
    version = next_version(model_dir)
    result = QuantizeResult(model=cfg.name, from_version=source_version, version=version, written=False,
                            calibration=calib_text, float_nodes=float_nodes, gate=gate,
                            attempts=tuple(attempts))
    if not gate.passed and not force:
        return result
    record = QuantizedVersion(version=version, from_version=source_version, method=METHOD,
                              calibration=calib_text, float_nodes=float_nodes)
    _write(model_dir, version, int8_bytes, cfg.replace(quantized=(*cfg.quantized, record)))
    return replace(result, written=True)


def format_report(result: QuantizeResult) -> str:
    """The table the command prints, whether or not the version was written."""
    g = result.gate
    lines = [f"{result.model}: version {result.from_version} (float32) → version {result.version} (int8, "
             f"{METHOD})",
             f"calibration: {result.calibration}",
             f"held-out: {g.data}, {g.images} images{'' if g.labelled else ', unlabelled (agreement only)'}",
             f"{'':24}{'float32':>10}{'int8':>10}   gate"]
    if g.float_accuracy is not None and g.int8_accuracy is not None:
        drop = (g.float_accuracy - g.int8_accuracy) * 100
        lines.append(f"{'top-1 accuracy':24}{g.float_accuracy:>10.2%}{g.int8_accuracy:>10.2%}   "
                     f"drop {drop:.2f} points (max {MAX_ACCURACY_DROP * 100:.1f})")
    lines.append(f"{'top-1 agreement':24}{'':>10}{g.agreement:>10.2%}   min {MIN_AGREEMENT:.0%}")
    for batch, (f, q) in sorted(g.speed.items()):
        lines.append(f"{f'img/s, batch {batch}':24}{f:>10.1f}{q:>10.1f}   {q / f:.2f}x (must be > 1)")
    lines.append(f"float32 compute nodes: {', '.join(result.float_nodes) or 'none'}")
    if len(result.attempts) > 1:
        lines.append("attempts: " + "; ".join(result.attempts))
    lines.append("gate: " + ("passed" if g.passed else "FAILED: " + "; ".join(g.failures)))
    return "\n".join(lines)


# ---- inputs ----------------------------------------------------------------------------------------


def _source(model_dir: Path, from_version: int | None, quantized: set[int]) -> tuple[int, Path]:
    if from_version is None:
        candidates = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()
                            and int(p.name) not in quantized and (p / MODEL_FILE).is_file()
                            and not _is_int8(p / MODEL_FILE))
        if not candidates:
            raise QuantizeError(f"model folder {model_dir} holds no float version to quantize")
        from_version = candidates[-1]
    try:
        version, path = evaluate.resolve_version(model_dir, from_version)
    except evaluate.EvaluateError as exc:
        raise QuantizeError(str(exc)) from None
    if version in quantized or _is_int8(path):
        raise QuantizeError(f"version {version} of {model_dir.name} is already int8; quantize a float one")
    return version, path


def _is_int8(path: Path) -> bool:
    """Whether the graph already quantizes (a record in config.json can be lost when export rewrites it)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(n.op_type == "QuantizeLinear" or n.op_type.startswith("QLinear") for n in graph.node)


def _calibration_inputs(cfg: ModelConfig, folder: Path | None) -> tuple[np.ndarray, str]:
    """(N, C, H, W) float32 preprocessed as the server does, and where they came from."""
    if folder is not None:
        dataset = datamod.load_image_files(folder)
        indices = _spread(np.arange(len(dataset)), CALIBRATION_IMAGES)
        return datamod.to_arrays(dataset, indices, cfg), f"{len(indices)} images from {folder}"
    if not cfg.training_data:
        raise QuantizeError(f"model '{cfg.name}' was not trained by convserve (its config names no "
                            "training_data): pass --calibration IMAGES_DIR, a folder of images like those "
                            "it will serve")
    dataset = datamod.load_dataset(cfg.training_data)
    indices = _spread(dataset.train_test()[0], CALIBRATION_IMAGES)
    return (datamod.to_arrays(dataset, indices, cfg),
            f"{len(indices)} images of {cfg.training_data} (its training split)")


def _gate_inputs(cfg: ModelConfig, folder: Path | None, calib_x: np.ndarray,
                 calib_text: str) -> tuple[np.ndarray, np.ndarray | None, str]:
    """The held-out images, with labels as model output indices when known."""
    if folder is not None:
        try:
            dataset = datamod.load_imagefolder(folder)
        except datamod.DataError:  # not one sub-folder per class: unlabelled images, agreement only
            dataset = datamod.load_image_files(folder)
            return datamod.to_arrays(dataset, np.arange(len(dataset)), cfg), None, str(folder)
        indices = np.arange(len(dataset))
        try:
            truth = evaluate.label_map(dataset, cfg)[dataset.labels]
        except evaluate.EvaluateError as exc:
            raise QuantizeError(f"--eval: {exc}") from None
        return datamod.to_arrays(dataset, indices, cfg), truth, f"{folder} (labelled by sub-folder)"
    if cfg.training_data:
        dataset = datamod.load_dataset(cfg.training_data)
        indices = dataset.train_test()[1]
        truth = evaluate.label_map(dataset, cfg)[dataset.labels[indices]]
        return datamod.to_arrays(dataset, indices, cfg), truth, f"{cfg.training_data} (its held-out split)"
    return calib_x, None, f"the calibration images ({calib_text}; no --eval folder given)"


def _spread(indices: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` of ``indices``, evenly spaced, so every part of the set is represented."""
    if len(indices) <= n:
        return indices
    return indices[np.linspace(0, len(indices) - 1, n).round().astype(np.int64)]


# ---- the graph -------------------------------------------------------------------------------------


def quantize_graph(float_bytes: bytes, input_name: str, calib_x: np.ndarray,
                   exclude: tuple[str, ...] = ()) -> bytes:
    """The int8 graph (METHOD) of a float ONNX graph, its activation ranges set by ``calib_x`` (N, C, H, W)
    preprocessed as served; nodes named in ``exclude`` stay float. Raises QuantizeError."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(np.array_split(calib_x, max(1, len(calib_x) // 16)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

    with tempfile.TemporaryDirectory(prefix="convserve-quantize-") as tmp, _quiet():
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(float_bytes)
        try:
            quantize_static(
                str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=list(exclude) or None,
                calibration_providers=["CPUExecutionProvider"])
        except Exception as exc:  # the quantizer raises many unrelated types
            raise QuantizeError(f"onnxruntime.quantization failed: {type(exc).__name__}: {exc}") from None
        return dst.read_bytes()


def _nodes(onnx_bytes: bytes) -> list:
    import onnx

    return list(onnx.load_from_string(onnx_bytes).graph.node)


def _first_last_compute(onnx_bytes: bytes) -> tuple[str, ...]:
    names = [n.name for n in _nodes(onnx_bytes) if n.op_type in COMPUTE_OPS and n.name]
    return tuple(dict.fromkeys(names[:1] + names[-1:]))


def float_compute_nodes(onnx_bytes: bytes) -> tuple[str, ...]:
    """Compute nodes whose data input does not come from a DequantizeLinear: they run in float32."""
    nodes = _nodes(onnx_bytes)
    dequantized = {out for n in nodes if n.op_type == "DequantizeLinear" for out in n.output}
    return tuple(n.name or n.op_type for n in nodes
                 if n.op_type in COMPUTE_OPS and n.input and n.input[0] not in dequantized)


def _session(onnx_bytes: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = SPEED_THREADS
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


def _predict(onnx_bytes: bytes, cfg: ModelConfig, x: np.ndarray) -> np.ndarray:
    session = _session(onnx_bytes)
    step = cfg.max_batch_size
    return np.concatenate([
        session.run([cfg.output.name], {cfg.input.name: x[i:i + step]})[0].argmax(axis=1)
        for i in range(0, len(x), step)])


# ---- the gates -------------------------------------------------------------------------------------


def _accuracy(predicted: np.ndarray, truth: np.ndarray | None) -> float | None:
    return None if truth is None else float(np.mean(predicted == truth))


def _accuracy_failures(float_out: np.ndarray, int8_out: np.ndarray, truth: np.ndarray | None) -> list[str]:
    failures = []
    agreement = float(np.mean(float_out == int8_out))
    if agreement < MIN_AGREEMENT:
        failures.append(f"top-1 agreement {agreement:.2%} < {MIN_AGREEMENT:.0%}")
    if truth is not None:
        drop = float(np.mean(float_out == truth)) - float(np.mean(int8_out == truth))
        if drop > MAX_ACCURACY_DROP:
            failures.append(f"top-1 accuracy drops {drop * 100:.2f} points > {MAX_ACCURACY_DROP * 100:.1f}")
    return failures


def _speed(float_bytes: bytes, int8_bytes: bytes, cfg: ModelConfig) -> dict[int, tuple[float, float]]:
    """In-process img/s of each graph at each batch size: interleaved rounds, median of each side."""
    sessions = (_session(float_bytes), _session(int8_bytes))
    rng = np.random.default_rng(0)
    speed = {}
    for batch in sorted({min(b, cfg.max_batch_size) for b in SPEED_BATCHES}):
        feed = {cfg.input.name: rng.normal(size=(batch, *cfg.input.shape)).astype(np.float32)}
        for s in sessions:
            s.run(None, feed)  # warm-up: first-run allocations
        rates: tuple[list[float], list[float]] = ([], [])
        for _ in range(SPEED_ROUNDS):
            for s, out in zip(sessions, rates, strict=True):
                runs, started = 0, time.perf_counter()
                while runs < 10_000 and (runs == 0 or time.perf_counter() - started < SPEED_ROUND_SECONDS):
                    s.run(None, feed)
                    runs += 1
                out.append(runs * batch / (time.perf_counter() - started))
        speed[batch] = (float(np.median(rates[0])), float(np.median(rates[1])))
    return speed


def _speed_failures(speed: dict[int, tuple[float, float]]) -> list[str]:
    return [f"int8 is not faster at batch {b} ({q:.1f} vs {f:.1f} img/s float32)"
            for b, (f, q) in sorted(speed.items()) if q <= f]


# ---- the write -------------------------------------------------------------------------------------


def _write(model_dir: Path, version: int, int8_bytes: bytes, cfg: ModelConfig) -> None:
    """Verify with the loader ``convserve import`` uses, then write the version and config atomically."""
    from convserve.server.repository.importer import ImportModelError, verify

    with tempfile.TemporaryDirectory(prefix="convserve-quantize-") as tmp:
        path = Path(tmp) / MODEL_FILE
        path.write_bytes(int8_bytes)
        try:
            verify(path, cfg)
        except ImportModelError as exc:
            raise QuantizeError(f"the int8 graph fails the server's load check: {exc}") from None
    try:
        check_writable(model_dir.parent)
        write_entry(model_dir, version, int8_bytes, cfg)
    except EntryWriteError as exc:
        raise QuantizeError(str(exc)) from None
    except OSError as exc:
        reason = exc.strerror or exc
        raise QuantizeError(f"cannot write version {version} under {model_dir}: {reason}") from None
    log.info("wrote %s version %d (int8)", cfg.name, version)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantizer logs advice on the root logger ("consider pre-processing"); keep it off the console."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)

