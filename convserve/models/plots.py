"""Training-curve and confusion-matrix PNGs, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _figure(width: float, height: float):  # type: ignore[no-untyped-def]
    # The object-oriented API with an explicit Agg canvas never touches pyplot's global state or a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_curves(history: Mapping[str, Sequence[float]], path: Path, title: str = "") -> Path:
    """Loss and accuracy per epoch, train beside held-out test, as one PNG."""
    fig = _figure(10, 4)
    epochs = np.arange(1, len(history.get("train_loss", ())) + 1)
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy"), strict=True):
        for side, style in (("train", "-"), ("test", "--")):
            values = history.get(f"{side}_{metric}", ())
            if len(values):
                ax.plot(epochs, values, style, marker=".", label=side)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.savefig(path)
    return Path(path)


def plot_confusion(matrix: np.ndarray, labels: Sequence[str], path: Path, title: str = "") -> Path:
    """Counts of (true class, predicted class) as a heat map with the numbers written in."""
    matrix = np.asarray(matrix)
    n = len(labels)
    side = max(4.0, 0.5 * n + 2)
    fig = _figure(side, side)
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ticks = np.arange(n)
    ax.set_xticks(ticks, labels=list(labels), rotation=45 if n > 10 else 0)
    ax.set_yticks(ticks, labels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:  # numbers stop being legible beyond this
        threshold = matrix.max() / 2 if matrix.size else 0
        for (row, col), count in np.ndenumerate(matrix):
            ax.text(col, row, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > threshold else "black")
    if title:
        ax.set_title(title)
    fig.savefig(path)
    return Path(path)
