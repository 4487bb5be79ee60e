"""The training loop: seeding, random-shift augmentation, one-cycle AdamW, metrics, plots and the checkpoint.

A checkpoint holds only plain dicts, lists, strings, numbers and tensors (``torch.load(weights_only=True)``
reads it): the state_dict, the architecture name and builder arguments, the ModelConfig dict (labels,
preprocessing) and the metrics — everything ``convserve export`` needs and nothing that unpickles code.
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convserve.common.model_config import ModelConfig, ModelConfigError

from . import data as datamod
from . import plots

CHECKPOINT_FILE = "checkpoint.pt"
CURVES_FILE = "training_curves.png"
CONFUSION_FILE = "confusion_matrix.png"
CHECKPOINT_FORMAT = 1


class TrainError(RuntimeError):
    """Training or checkpoint loading cannot proceed; the message says why in one line."""


@dataclass(frozen=True)
class TrainOptions:
    arch: str = "lenet"
    seed: int = 0
    epochs: int = 15
    batch_size: int = 64
    lr: float = 3e-3  # peak of the one-cycle schedule
    weight_decay: float = 5e-4
    width: float = 1.0
    color_mode: str = "L"
    input_size: int = 28
    max_shift: int | None = None  # pixels; None → input_size // 14 (2 px at 28, ~half a digits pixel)
    fit_ink: int | None = None  # preprocessing's ink box in pixels (grayscale); None → plain resize
    device: str | None = None  # None → cuda when available
    threads: int | None = None  # None → min(4, CPU count)
    progress: bool = True


@dataclass
class TrainResult:
    model: nn.Module
    config: ModelConfig
    metrics: dict[str, Any]
    history: dict[str, list[float]] = field(default_factory=dict)
    checkpoint: Path | None = None
    curves_png: Path | None = None
    confusion_png: Path | None = None


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels where it has them."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # cuBLAS needs this before its first call to be deterministic; harmless on CPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_device(requested: str | None) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise TrainError(f"--device {requested!r} is not a torch device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {requested}: CUDA is not available on this machine")
    return device


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by its own random (dy, dx) in [-max_shift, max_shift], edges replicated.

    One gather for the whole batch: pad, then index rows and columns shifted per sample.
    """
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    shifts = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).to(x.device)  # (2, N)
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")  # (N, C, H+2s, W+2s)
    rows = shifts[0][:, None] + torch.arange(h, device=x.device)[None, :]  # (N, H)
    cols = shifts[1][:, None] + torch.arange(w, device=x.device)[None, :]  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def train(dataset: datamod.ImageDataset, options: TrainOptions, out_dir: Path | None) -> TrainResult:
    """Train ``options.arch`` on the training side of the fixed split; measure it on the held-out side.

    The test split is only measured, never used to choose epochs or weights: the last epoch's weights are
    the result. Writes checkpoint.pt and the two PNGs into ``out_dir`` (when given). Raises TrainError.
    """
    from .registry import UnknownArchitectureError, build

    device = resolve_device(options.device)
    threads = options.threads or min(4, os.cpu_count() or 1)
    previous = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    torch.set_num_threads(threads)
    seed_everything(options.seed)
    try:
        try:
            cfg = datamod.model_config_for(dataset, f"{dataset.short_name}_{options.arch}",
                                           options.color_mode, options.input_size, architecture=options.arch,
                                           fit_ink=options.fit_ink)
        except ModelConfigError as exc:
            raise TrainError(str(exc)) from None
        train_idx, test_idx = dataset.train_test()
        if len(train_idx) == 0 or len(test_idx) == 0:
            raise TrainError(f"{dataset.source}: too few images for a train/test split "
                             f"({len(dataset)} images; each class needs at least 2)")
        x_train = torch.from_numpy(datamod.to_arrays(dataset, train_idx, cfg)).to(device)
        y_train = torch.from_numpy(dataset.labels[train_idx]).to(device)
        x_test = torch.from_numpy(datamod.to_arrays(dataset, test_idx, cfg)).to(device)
        y_test = torch.from_numpy(dataset.labels[test_idx]).to(device)

        arch_kwargs = {"in_channels": cfg.input.channels, "num_classes": len(dataset.class_names),
                       "input_size": options.input_size, "width": float(options.width)}
        try:
            model = build(options.arch, **arch_kwargs).to(device)
        except UnknownArchitectureError as exc:
            raise TrainError(str(exc)) from None
        except ValueError as exc:
            raise TrainError(f"cannot build {options.arch!r} for this data: {exc}") from None

        started = time.perf_counter()
        history = _fit(model, x_train, y_train, x_test, y_test, options, device)
        seconds = time.perf_counter() - started

        test_loss, predictions = _predict(model, x_test, y_test, options.batch_size)
        confusion = _confusion(y_test.cpu().numpy(), predictions, len(dataset.class_names))
        correct = int(np.trace(confusion))
        metrics: dict[str, Any] = {
            "test_accuracy": correct / len(test_idx), "test_correct": correct, "test_size": len(test_idx),
            "test_loss": test_loss, "train_size": len(train_idx), "epochs": options.epochs,
            "train_seconds": seconds, "device": str(device), "threads": threads,
            "confusion": confusion.tolist(),
        }
        result = TrainResult(model=model.cpu().eval(), config=cfg, metrics=metrics, history=history)
        if out_dir is not None:
            _write_outputs(result, dataset, options, arch_kwargs, Path(out_dir))
        return result
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1], warn_only=previous[2])


def _fit(model: nn.Module, x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor,
         options: TrainOptions, device: torch.device) -> dict[str, list[float]]:
    from tqdm.auto import tqdm

    # Data order and augmentation draw from their own generator, so they do not depend on how many
    # random numbers the architecture's initialisation consumed.
    generator = torch.Generator().manual_seed(options.seed)
    max_shift = options.input_size // 14 if options.max_shift is None else options.max_shift
    steps = (len(x_train) + options.batch_size - 1) // options.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=options.lr,
                                                   total_steps=max(1, options.epochs * steps))
    history: dict[str, list[float]] = {"train_loss": [], "train_accuracy": [], "test_loss": [],
                                       "test_accuracy": []}
    epochs = tqdm(range(1, options.epochs + 1), desc="epochs", unit="epoch", disable=not options.progress,
                  file=sys.stderr)
    for epoch in epochs:
        model.train()
        order = torch.randperm(len(x_train), generator=generator).to(device)
        loss_sum, correct = 0.0, 0
        batches = tqdm(range(steps), desc=f"epoch {epoch}", unit="batch", leave=False,
                       disable=not options.progress, file=sys.stderr)
        for step in batches:
            idx = order[step * options.batch_size:(step + 1) * options.batch_size]
            xb = random_shift(x_train[idx], max_shift, generator)
            yb = y_train[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.detach().argmax(1) == yb).sum())
        test_loss, predictions = _predict(model, x_test, y_test, options.batch_size)
        test_accuracy = float((predictions == y_test.cpu().numpy()).mean())
        history["train_loss"].append(loss_sum / len(x_train))
        history["train_accuracy"].append(correct / len(x_train))
        history["test_loss"].append(test_loss)
        history["test_accuracy"].append(test_accuracy)
        tqdm.write(f"epoch {epoch:3d}/{options.epochs}  train loss {history['train_loss'][-1]:.4f}  "
                   f"acc {history['train_accuracy'][-1]:.4f}  |  test loss {test_loss:.4f}  "
                   f"acc {test_accuracy:.4f}", file=sys.stdout)
    return history


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and argmax predictions over (x, y) in eval mode."""
    model.eval()
    loss_sum, predictions = 0.0, []
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size])
        loss_sum += float(F.cross_entropy(logits, y[start:start + batch_size], reduction="sum"))
        predictions.append(logits.argmax(1).cpu().numpy())
    model.train()
    return loss_sum / max(1, len(x)), np.concatenate(predictions) if predictions else np.empty(0, np.int64)


def _confusion(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts: rows are true classes, columns predicted ones."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix


def _write_outputs(result: TrainResult, dataset: datamod.ImageDataset, options: TrainOptions,
                   arch_kwargs: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "arch": options.arch,
        "arch_kwargs": arch_kwargs,
        "state_dict": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
        "model_config": result.config.to_dict(),
        "metrics": result.metrics,
        "history": result.history,
        "data": {"source": dataset.source, "split_seed": datamod.SPLIT_SEED,
                 "test_fraction": datamod.TEST_FRACTION},
        "options": {k: v for k, v in vars(options).items() if k != "progress"},
    }
    path = out_dir / CHECKPOINT_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)  # a reader never sees half a checkpoint
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise TrainError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
    result.checkpoint = path
    try:
        result.curves_png = plots.plot_curves(result.history, out_dir / CURVES_FILE,
                                              title=f"{options.arch} on {dataset.source}")
        result.confusion_png = plots.plot_confusion(
            np.asarray(result.metrics["confusion"]), dataset.class_names, out_dir / CONFUSION_FILE,
            title=f"{options.arch}: held-out test accuracy {result.metrics['test_accuracy']:.2%}")
    except OSError as exc:
        raise TrainError(f"cannot write plots into {out_dir}: {exc.strerror or exc}") from None


def load_checkpoint(path: Path) -> tuple[nn.Module, ModelConfig]:
    """Rebuild the trained model (eval mode, CPU) and its ModelConfig from a checkpoint; raises TrainError."""
    from .registry import UnknownArchitectureError, build

    path = Path(path)
    if not path.is_file():
        raise TrainError(f"checkpoint {path} does not exist" if not path.exists()
                         else f"checkpoint {path} is not a file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises a variety of types for truncated or foreign files
        raise TrainError(f"checkpoint {path} cannot be read: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"checkpoint {path} was not written by `convserve train` "
                         f"(format {CHECKPOINT_FORMAT})")
    try:
        cfg = ModelConfig.from_dict(ckpt["model_config"])
        model = build(ckpt["arch"], **ckpt["arch_kwargs"])
        model.load_state_dict(ckpt["state_dict"])
    except (ModelConfigError, UnknownArchitectureError) as exc:
        raise TrainError(f"checkpoint {path}: {exc}") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise TrainError(f"checkpoint {path} does not match its architecture: {exc}") from None
    return model.eval(), cfg
