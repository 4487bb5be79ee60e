"""What a kernel learned: the first layer's kernels and one image's feature maps, read from the served model.

The exported ``model.onnx`` is the source (BatchNorm is folded into the convolutions there, so these are
the kernels the server applies). Feature maps come from the same graph run by ONNX Runtime with the
intermediate tensors added as outputs: after each convolution's activation, and after each pooling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import evaluate

MAX_MAPS = 16  # channels drawn per layer: enough to see what varies, small enough to read
CONV_OPS = ("Conv",)
POOL_OPS = ("MaxPool", "AveragePool")
ACTIVATIONS = ("Relu", "Tanh", "Sigmoid", "LeakyRelu", "Clip")


@dataclass(frozen=True)
class Inspection:
    model: str
    version: int
    image: np.ndarray  # (C, H, W) the model input, normalised
    probabilities: np.ndarray  # (num_classes,)
    labels: tuple[str, ...]
    kernels: np.ndarray  # (out, in, kh, kw) of the first convolution
    layers: list[tuple[str, np.ndarray]]  # (title, (C, H, W) feature maps) in graph order


def inspect_model(model_dir: Path, image_path: Path, version: int | None = None) -> Inspection:
    """Run ``image_path`` through the exported model with every conv/pool output exposed.

    Raises EvaluateError (no convolution, unreadable model) or the server's InvalidInputError (bad image).
    """
    import onnx
    import onnxruntime as ort

    from convserve.common.model_config import ModelConfigError, load_config
    from convserve.server.runtime.preprocess import decode_image

    model_dir = Path(model_dir)
    try:
        cfg = load_config(model_dir)
    except ModelConfigError as exc:
        raise evaluate.EvaluateError(str(exc)) from None
    version, path = evaluate.resolve_version(model_dir, version)
    model = onnx.load(str(path))
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type in CONV_OPS]
    if not convs or convs[0].input[1] not in initializers:
        raise evaluate.EvaluateError(f"{path}: no convolution with constant weights to inspect")
    kernels = onnx.numpy_helper.to_array(initializers[convs[0].input[1]]).astype(np.float32)

    wanted = _layer_outputs(graph)
    present = {o.name for o in graph.output}
    graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name, _ in wanted
                        if name not in present)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = decode_image(Path(image_path).read_bytes(), cfg, where=str(image_path))[None]  # (1, C, H, W)
    names = [cfg.output.name] + [name for name, _ in wanted]
    outputs = session.run(names, {cfg.input.name: x})
    logits = outputs[0][0].astype(np.float64)
    if cfg.output.kind == "logits":
        e = np.exp(logits - logits.max())
        probabilities = e / e.sum()
    else:
        probabilities = logits
    layers = [(title, out[0]) for (_, title), out in zip(wanted, outputs[1:], strict=True)]
    return Inspection(model=cfg.name, version=version, image=x[0], probabilities=probabilities,
                      labels=cfg.labels, kernels=kernels, layers=layers)


def _layer_outputs(graph: object) -> list[tuple[str, str]]:
    """(tensor name, title) of each convolution's activated output and each pooling output, in order."""
    consumers: dict[str, list[object]] = {}
    for node in graph.node:  # type: ignore[attr-defined]
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    chosen: list[tuple[str, str]] = []
    n_conv = n_pool = 0
    for node in graph.node:  # type: ignore[attr-defined]
        if node.op_type in CONV_OPS:
            n_conv += 1
            out = node.output[0]
            after = consumers.get(out, [])
            if len(after) == 1 and after[0].op_type in ACTIVATIONS:
                chosen.append((after[0].output[0], f"conv{n_conv} + {after[0].op_type.lower()}"))
            else:
                chosen.append((out, f"conv{n_conv}"))
        elif node.op_type in POOL_OPS:
            n_pool += 1
            chosen.append((node.output[0], f"pool{n_pool} ({node.op_type})"))
    return chosen


def plot(result: Inspection, path: Path) -> Path:
    """One PNG: the input as the model sees it with its top prediction, the first layer's kernels, then up
    to MAX_MAPS feature maps per layer (each map scaled to its own range; brighter = stronger response)."""
    from .plots import _figure

    kernels = result.kernels.reshape(-1, *result.kernels.shape[2:])  # (out*in, kh, kw)
    rows = [("first-layer kernels", kernels, "RdBu_r")]
    rows += [(f"{title}: {maps.shape[0]} maps of {maps.shape[1]}x{maps.shape[2]}", maps[:MAX_MAPS], "magma")
             for title, maps in result.layers if maps.ndim == 3]
    columns = max(MAX_MAPS, min(len(kernels), 32))
    fig = _figure(columns * 0.75, 1.25 * (len(rows) + 1) + 0.5)
    panels = fig.subfigures(len(rows) + 1, 1)
    top = int(np.argmax(result.probabilities))
    ax = panels[0].subplots(1, columns)[0]
    for other in panels[0].axes[1:]:
        other.set_axis_off()
    ax.imshow(result.image.mean(axis=0), cmap="gray")
    ax.set_axis_off()
    verdict = f"'{result.labels[top]}' ({result.probabilities[top]:.1%})"
    panels[0].suptitle(f"input as the model sees it → {verdict}", x=0.01, ha="left", fontsize=9)
    for panel, (title, maps, cmap) in zip(panels[1:], rows, strict=True):
        limit = float(np.abs(maps).max()) or 1.0
        for c, ax in enumerate(panel.subplots(1, columns)):
            ax.set_axis_off()
            if c >= len(maps):
                continue
            if cmap == "RdBu_r":  # kernels: one symmetric scale, so red = positive weight, blue = negative
                ax.imshow(maps[c], cmap=cmap, vmin=-limit, vmax=limit)
            else:
                ax.imshow(maps[c], cmap=cmap)
        panel.suptitle(title, x=0.01, ha="left", fontsize=9)
    fig.suptitle(f"{result.model} v{result.version}: what the kernels respond to", fontsize=10)
    fig.savefig(path)
    return Path(path)
