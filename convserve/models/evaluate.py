"""Accuracy of an exported model entry, measured by ONNX Runtime with the preprocessing from its config.json.

The number users trust is the served artefact's: this runs ``model.onnx`` exactly as the server would
(same config, same ``image_to_array``), not the PyTorch checkpoint it came from.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convserve.common.model_config import MODEL_FILE, ModelConfig, ModelConfigError, load_config

from . import data as datamod

# `evaluate --generalisation`: the in-distribution split first, then the sets made from data and
# transformations the bundled model never trained on (data.BUILTIN_SOURCES says what each is).
GENERALISATION_SETS = ("digits", "digits-mnist-style", "fonts-unseen")


class EvaluateError(RuntimeError):
    """The model entry cannot be evaluated on this data; the message says why in one line."""


@dataclass(frozen=True)
class EvalResult:
    model: str
    version: int
    data: str
    split: str
    accuracy: float
    correct: int
    total: int
    per_class_accuracy: dict[str, float]
    seconds: float  # ONNX Runtime time only, preprocessing excluded

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_version(model_dir: Path, version: int | None) -> tuple[int, Path]:
    """(version, path to model.onnx): the requested version, or the highest numeric one present."""
    if not model_dir.is_dir():
        raise EvaluateError(f"model folder {model_dir} does not exist")
    available = sorted(int(p.name) for p in model_dir.iterdir()
                       if p.is_dir() and p.name.isdigit() and (p / MODEL_FILE).is_file())
    if not available:
        raise EvaluateError(f"model folder {model_dir} holds no <version>/{MODEL_FILE}")
    if version is None:
        version = available[-1]
    elif version not in available:
        raise EvaluateError(f"model folder {model_dir} has no version {version}; available: {available}")
    return version, model_dir / str(version) / MODEL_FILE


def evaluate_model_dir(model_dir: Path, data_spec: str, *, version: int | None = None, split: str = "test",
                       batch_size: int = 128) -> EvalResult:
    """Classify the chosen images with the exported model; raises EvaluateError or data.DataError.

    ``split="test"`` takes the fixed held-out split (the images ``convserve train`` never trained on);
    ``split="all"`` every image of the source, e.g. a separate folder of new photos.
    """
    import onnxruntime as ort

    model_dir = Path(model_dir)
    try:
        cfg = load_config(model_dir)
    except ModelConfigError as exc:
        raise EvaluateError(str(exc)) from None
    version, onnx_path = resolve_version(model_dir, version)
    dataset = datamod.load_dataset(data_spec)
    to_model = label_map(dataset, cfg)
    if split == "test":
        indices = dataset.train_test()[1]
    elif split == "all":
        indices = np.arange(len(dataset))
    else:
        raise EvaluateError(f"split must be 'test' or 'all', got {split!r}")
    if len(indices) == 0:
        raise EvaluateError(f"{data_spec}: the {split} split is empty")

    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for unreadable graphs
        raise EvaluateError(f"{onnx_path}: ONNX Runtime cannot load it: {exc}") from None
    x = datamod.to_arrays(dataset, indices, cfg)  # (N, C, H, W) float32, as the server preprocesses
    truth = to_model[dataset.labels[indices]]
    predicted = np.empty(len(indices), dtype=np.int64)
    seconds = 0.0
    step = min(batch_size, cfg.max_batch_size)
    for start in range(0, len(x), step):
        started = time.perf_counter()
        (logits,) = session.run([cfg.output.name], {cfg.input.name: x[start:start + step]})
        seconds += time.perf_counter() - started
        predicted[start:start + step] = np.argmax(logits, axis=1)  # softmax keeps the argmax

    hits = predicted == truth
    per_class = {cfg.labels[c]: float(hits[truth == c].mean()) for c in np.unique(truth)}
    return EvalResult(model=cfg.name, version=version, data=dataset.source, split=split,
                      accuracy=float(hits.mean()), correct=int(hits.sum()), total=len(hits),
                      per_class_accuracy=per_class, seconds=seconds)


def label_map(dataset: datamod.ImageDataset, cfg: ModelConfig) -> np.ndarray:
    """Dataset class index → model output index, matched by label name (folder order need not agree)."""
    position = {label: i for i, label in enumerate(cfg.labels)}
    missing = [name for name in dataset.class_names if name not in position]
    if missing:
        raise EvaluateError(f"{dataset.source}: class(es) {missing} are not among model '{cfg.name}' labels "
                            f"{list(cfg.labels)}")
    return np.asarray([position[name] for name in dataset.class_names], dtype=np.int64)


def format_report(result: EvalResult) -> str:
    """Human-readable summary: overall accuracy first, then per class."""
    lines = [
        f"model {result.model} version {result.version} on {result.data} ({result.split} split)",
        f"accuracy {result.accuracy:.4f} ({result.correct}/{result.total})  "
        f"ONNX Runtime time {result.seconds * 1000:.1f} ms",
        "per class: " + "  ".join(f"{label}={acc:.3f}" for label, acc in result.per_class_accuracy.items()),
    ]
    return "\n".join(lines)


def format_summary(results: list[EvalResult]) -> str:
    """Several data sets side by side: one row each, accuracy first."""
    first = results[0]
    width = max(len(r.data) for r in results)
    lines = [f"model {first.model} version {first.version}",
             f"{'data':<{width}}  {'split':<5}  {'accuracy':>8}  {'correct':>11}  worst class"]
    for r in results:
        worst = min(r.per_class_accuracy.items(), key=lambda kv: kv[1])
        lines.append(f"{r.data:<{width}}  {r.split:<5}  {r.accuracy * 100:>7.2f}%  "
                     f"{f'{r.correct}/{r.total}':>11}  {worst[0]} ({worst[1] * 100:.1f}%)")
    return "\n".join(lines)


def plot_samples(model_dir: Path, data_specs: list[str], path: Path, per_set: int = 12,
                 version: int | None = None) -> Path:
    """A PNG showing, for each data source, ``per_set`` images spread evenly over its test side: as sent
    (top row) and as the model sees them after preprocessing (bottom row), titled truth → prediction,
    red where wrong. Why: a figure tells what a held-out set is far better than its description."""
    import onnxruntime as ort

    from .plots import _figure

    model_dir = Path(model_dir)
    try:
        cfg = load_config(model_dir)
    except ModelConfigError as exc:
        raise EvaluateError(str(exc)) from None
    _, onnx_path = resolve_version(model_dir, version)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    fig = _figure(per_set * 0.9 + 0.5, 2.1 * len(data_specs) + 0.4)
    for panel, spec in zip(np.atleast_1d(fig.subfigures(len(data_specs), 1)), data_specs, strict=True):
        dataset = datamod.load_dataset(spec)
        test = dataset.train_test()[1]
        picks = test[np.linspace(0, len(test) - 1, min(per_set, len(test))).round().astype(int)]
        x = datamod.to_arrays(dataset, picks, cfg)
        predicted = np.argmax(session.run([cfg.output.name], {cfg.input.name: x})[0], axis=1)
        axes = panel.subplots(2, per_set)
        for col, (i, seen, guess) in enumerate(zip(picks, x, predicted, strict=True)):
            truth = dataset.class_names[dataset.labels[i]]
            axes[0, col].imshow(dataset.load(int(i)).convert("L"), cmap="gray", vmin=0, vmax=255)
            axes[1, col].imshow(seen.mean(axis=0), cmap="gray")
            axes[0, col].set_title(f"{truth}→{cfg.labels[guess]}", fontsize=8,
                                   color="black" if cfg.labels[guess] == truth else "red")
        for ax in axes.ravel():
            ax.set_axis_off()
        panel.suptitle(f"{dataset.source}: as sent (top), as the model sees it (bottom)", x=0.01, ha="left",
                       fontsize=9)
    fig.savefig(path)
    return Path(path)
