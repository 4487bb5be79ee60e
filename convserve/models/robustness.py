"""The seed's priors, measured: accuracy of exported models as their inputs are shifted, scaled and rotated.

Each transformation acts on the model's input tensor — after preprocessing, so the server's centring by
mass cannot undo it — with the background (pixel value 0) filling what moves in. Every model runs as
served (``model.onnx`` through ONNX Runtime), so a CNN and a dense MLP trained the same way are compared
on identical tensors. A shift of s pixels is scored over the eight directions (±s, 0), (0, ±s), (±s, ±s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import data as datamod
from . import evaluate

SHIFTS: tuple[float, ...] = (0, 1, 2, 3, 4, 5, 6)  # pixels
SCALES: tuple[float, ...] = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4)  # zoom factor about the centre
ROTATIONS: tuple[float, ...] = (-45, -30, -20, -10, 0, 10, 20, 30, 45)  # degrees, counter-clockwise
KINDS = ("shift", "scale", "rotation")
UNITS = {"shift": "pixels", "scale": "factor", "rotation": "degrees"}


@dataclass(frozen=True)
class ModelCurves:
    """One model's accuracy at each value of each transformation."""

    name: str
    model_dir: str
    architecture: str
    parameters: int
    accuracy: dict[str, list[float]]  # kind → one accuracy per value in RobustnessResult.values[kind]


@dataclass(frozen=True)
class RobustnessResult:
    data: str
    split: str
    images: int
    values: dict[str, list[float]]
    models: list[ModelCurves]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def transform(x: np.ndarray, kind: str, value: float, mean: Sequence[float],
              std: Sequence[float]) -> np.ndarray:
    """Scale (zoom ``value``) or rotate (``value`` degrees) a normalised (N, C, H, W) batch about its centre,
    filling with the background → normalised float32 of the same shape. Shifts go through ``shifted``."""
    m = np.asarray(mean, dtype=np.float32)[None, :, None, None]
    s = np.asarray(std, dtype=np.float32)[None, :, None, None]
    pixels = x * s + m  # back to 0..1, where 0 is the background the model was trained on
    if kind == "scale":
        out = _warp(pixels, np.array([[1 / value, 0.0], [0.0, 1 / value]]))
    elif kind == "rotation":
        a = np.deg2rad(value)
        out = _warp(pixels, np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]))  # y points down
    else:
        raise ValueError(f"kind must be 'scale' or 'rotation' here (shifts go through shifted), got {kind!r}")
    return ((out - m) / s).astype(np.float32)


def shifted(x: np.ndarray, dy: int, dx: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Translate a normalised (N, C, H, W) batch by whole pixels; what moves in is background."""
    m = np.asarray(mean, dtype=np.float32)[None, :, None, None]
    s = np.asarray(std, dtype=np.float32)[None, :, None, None]
    pixels = x * s + m
    out = np.zeros_like(pixels)
    h, w = x.shape[2:]
    src_y, dst_y = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
    src_x, dst_x = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
    out[:, :, dst_y, dst_x] = pixels[:, :, src_y, src_x]
    return ((out - m) / s).astype(np.float32)


def _warp(pixels: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """Resample each image at ``inverse @ (p - centre) + centre`` (bilinear, zeros outside)."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = pixels.shape
    theta = np.zeros((n, 2, 3), dtype=np.float32)
    theta[:, :, :2] = inverse  # affine_grid works in [-1, 1] coordinates centred on the image
    grid = F.affine_grid(torch.from_numpy(theta), [n, pixels.shape[1], h, w], align_corners=False)
    out = F.grid_sample(torch.from_numpy(np.ascontiguousarray(pixels)), grid, mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return out.numpy()


def measure(model_dirs: Sequence[Path], data_spec: str = "digits", split: str = "test",
            batch_size: int = 256, versions: Sequence[int | None] | None = None) -> RobustnessResult:
    """Accuracy of each model at every shift, scale and rotation; raises EvaluateError or DataError.

    All models must share one input shape and preprocessing (the first model's config prepares the images).
    ``versions`` gives one version per model folder (None: its highest), so one model's float and int8
    versions can be compared side by side.
    """
    import onnxruntime as ort

    if not model_dirs:
        raise evaluate.EvaluateError("robustness needs at least one model folder")
    versions = list(versions) if versions is not None else [None] * len(model_dirs)
    if len(versions) != len(model_dirs):
        raise evaluate.EvaluateError(f"got {len(versions)} versions for {len(model_dirs)} model folders; "
                                     "give one --version per --model-dir, or one for all")
    loaded = [_load(Path(d), v) for d, v in zip(model_dirs, versions, strict=True)]
    cfg = loaded[0][0]
    for other, _, _ in loaded[1:]:
        if (other.input.shape, other.preprocessing) != (cfg.input.shape, cfg.preprocessing):
            raise evaluate.EvaluateError(f"models '{cfg.name}' and '{other.name}' differ in input shape or "
                                         "preprocessing; robustness compares models on identical tensors")
    dataset = datamod.load_dataset(data_spec)
    to_model = evaluate.label_map(dataset, cfg)
    indices = dataset.train_test()[1] if split == "test" else np.arange(len(dataset))
    if len(indices) == 0:
        raise evaluate.EvaluateError(f"{data_spec}: the {split} split is empty")
    x = datamod.to_arrays(dataset, indices, cfg)
    truth = to_model[dataset.labels[indices]]
    mean, std = cfg.preprocessing.mean, cfg.preprocessing.std
    sessions = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for _, path, _ in loaded]

    def accuracies(batch: np.ndarray) -> list[float]:
        return [float((_predict(sess, c, batch, batch_size) == truth).mean())
                for sess, (c, _, _) in zip(sessions, loaded, strict=True)]

    values = {"shift": list(SHIFTS), "scale": list(SCALES), "rotation": list(ROTATIONS)}
    table: dict[str, list[list[float]]] = {kind: [] for kind in KINDS}  # kind → per value → per model
    for s in SHIFTS:
        s = int(s)
        moves = [(0, 0)] if s == 0 else [(dy, dx) for dy in (-s, 0, s) for dx in (-s, 0, s)
                                         if (dy, dx) != (0, 0)]
        per_move = [accuracies(shifted(x, dy, dx, mean, std)) for dy, dx in moves]
        table["shift"].append(list(np.mean(per_move, axis=0)))
    for kind, grid in (("scale", SCALES), ("rotation", ROTATIONS)):
        for v in grid:
            identity = v == (1.0 if kind == "scale" else 0)
            table[kind].append(accuracies(x if identity else transform(x, kind, v, mean, std)))
    models = [ModelCurves(name=f"{c.name} v{path.parent.name}" if versions[i] is not None else c.name,
                          model_dir=str(d), architecture=c.architecture, parameters=params,
                          accuracy={kind: [row[i] for row in table[kind]] for kind in KINDS})
              for i, ((c, path, params), d) in enumerate(zip(loaded, model_dirs, strict=True))]
    return RobustnessResult(data=dataset.source, split=split, images=len(indices), values=values,
                            models=models)


def _load(model_dir: Path, version: int | None = None) -> tuple[Any, Path, int]:
    import onnx

    from convserve.common.model_config import ModelConfigError, load_config

    try:
        cfg = load_config(model_dir)
    except ModelConfigError as exc:
        raise evaluate.EvaluateError(str(exc)) from None
    _, path = evaluate.resolve_version(model_dir, version)
    graph = onnx.load(str(path)).graph
    params = int(sum(np.prod(t.dims) for t in graph.initializer))
    return cfg, path, params


def _predict(session: Any, cfg: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    step = min(batch_size, cfg.max_batch_size)
    out = [np.argmax(session.run([cfg.output.name], {cfg.input.name: x[i:i + step]})[0], axis=1)
           for i in range(0, len(x), step)]
    return np.concatenate(out)


def format_table(result: RobustnessResult) -> str:
    """One block per transformation: a row per value, a column per model (accuracy in percent)."""
    names = [m.name for m in result.models]
    width = max(9, *(len(n) for n in names))
    lines = [f"accuracy on {result.data} ({result.split} split, {result.images} images), input transformed "
             "after preprocessing",
             "models: " + "; ".join(f"{m.name} = {m.architecture or '?'}, {m.parameters:,} parameters"
                                    for m in result.models)]
    for kind in KINDS:
        lines.append("")
        lines.append(f"{kind + ' (' + UNITS[kind] + ')':<18}" + "".join(f"{n:>{width + 2}}" for n in names))
        for row, value in enumerate(result.values[kind]):
            cells = "".join(f"{m.accuracy[kind][row] * 100:>{width + 1}.1f}%" for m in result.models)
            lines.append(f"{value:<18g}" + cells)
    return "\n".join(lines)


def plot(result: RobustnessResult, path: Path) -> Path:
    """Accuracy against shift, scale and rotation, one line per model, as one PNG."""
    from .plots import _figure

    fig = _figure(13, 4)
    for ax, kind in zip(fig.subplots(1, 3), KINDS, strict=True):
        for m, style in zip(result.models, ("o-", "s--", "^:", "d-."), strict=False):
            ax.plot(result.values[kind], [a * 100 for a in m.accuracy[kind]], style,
                    label=f"{m.name} ({m.architecture}, {m.parameters / 1000:.1f}k params)")
        ax.set_xlabel(f"{kind} ({UNITS[kind]})")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"Accuracy under transformations of the input ({result.data}, {result.images} images)")
    fig.savefig(path)
    return Path(path)
