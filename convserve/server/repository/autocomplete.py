"""A model config completed from the ONNX graph itself, as Triton auto-completes a bare ``1/model.onnx``.

The graph fixes what a config would otherwise have to say: the input's name and (C, H, W), the output's
name and class count. What it cannot say gets neutral defaults: labels are the class indices ("0",
"1", ...), encoded images are converted to L or RGB by the channel count, resized to (H, W) and scaled
to [0, 1] with no further normalisation, and the output is taken as logits. Such a model serves raw
tensors exactly; for images with the right normalisation and real labels, write a config
(``convserve import`` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from convserve.common.model_config import MODEL_FILE, ModelConfig, ModelConfigError

from .model_files import STRICT, Boundary, check_graph

# Channel count → the PIL mode encoded images are converted to.
COLOR_MODES = {1: "L", 3: "RGB"}
DEFAULT_MAX_BATCH_SIZE = 64


@dataclass(frozen=True)
class GraphSignature:
    """What one ONNX graph says about its single image input and its class-score output."""

    input_name: str
    input_shape: tuple[int, int, int]  # C, H, W
    batch: int | None  # a fixed batch dimension, None when dynamic
    output_name: str
    num_classes: int


def read_signature(model_path: Path, boundary: Boundary = STRICT) -> GraphSignature:
    """Open the graph with ONNX Runtime (CPU) and read its input/output; a probe run gives the class count.

    Raises ModelConfigError naming what the graph has when it is not a one-image-input classifier:
    one float input [N, C, H, W] with fixed C, H, W and C in (1, 3); an output [N, K].
    """
    import numpy as np
    import onnxruntime as ort

    where = f"{model_path}"
    try:
        data = Path(model_path).read_bytes()
    except OSError as exc:
        raise ModelConfigError(f"{where}: cannot read the graph: {exc.strerror or exc}") from None
    check_graph(Path(model_path), data, boundary)  # external data stays beside the graph
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # any ONNX Runtime load failure becomes a config error with its first line
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelConfigError(f"{where}: cannot read the graph: {text}") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise ModelConfigError(f"{where}: graph has {len(inputs)} inputs {names}; expected one")
    inp = inputs[0]
    if inp.type != "tensor(float)":
        raise ModelConfigError(f"{where}: graph input {inp.name!r} is {inp.type}; expected tensor(float)")
    shape = list(inp.shape)
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise ModelConfigError(
            f"{where}: graph input {inp.name!r} has shape {shape}; expected [N, C, H, W] with fixed C, H, W"
        )
    c, h, w = (int(d) for d in shape[1:])
    if c not in COLOR_MODES:
        raise ModelConfigError(
            f"{where}: graph input has {c} channels; convserve serves 1- or 3-channel images"
        )
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    if batch is not None and batch != 1:
        raise ModelConfigError(
            f"{where}: graph batch dimension is fixed at {batch}; export with a dynamic batch dimension"
        )
    out = outputs[0]
    probe = session.run([out.name], {inp.name: np.zeros((1, c, h, w), np.float32)})[0]
    if probe.ndim != 2:
        raise ModelConfigError(
            f"{where}: graph output {out.name!r} has shape {list(probe.shape)} for one image; expected [1, K]"
        )
    return GraphSignature(inp.name, (c, h, w), batch, out.name, int(probe.shape[1]))


def latest_model_file(model_dir: Path, filename: str = MODEL_FILE, source: str = "") -> Path:
    """The highest numeric version folder's graph (``filename``): the one a config is completed from.
    ``source`` names the config file being completed, for the message; "" for a bare folder."""
    versions = sorted(
        (int(p.name) for p in Path(model_dir).iterdir() if p.is_dir() and p.name.isdigit()), reverse=True
    )
    for v in versions:
        path = Path(model_dir) / str(v) / filename
        if path.is_file():
            return path
    if source:
        raise ModelConfigError(
            f"{model_dir}: {source} leaves dims to the graph, but no <version>/{filename} exists"
        )
    raise ModelConfigError(
        f"{model_dir}: no config.json, no config.pbtxt and no <version>/{MODEL_FILE} to complete "
        "a config from"
    )


def config_from_signature(name: str, sig: GraphSignature) -> ModelConfig:
    """The neutral config for a graph (see the module docstring); validated."""
    c, h, w = sig.input_shape
    mode = COLOR_MODES[c]
    data = {
        "name": name,
        "input": {"name": sig.input_name, "shape": [c, h, w]},
        "output": {"name": sig.output_name, "kind": "logits"},
        "preprocessing": {"color_mode": mode, "resize": [h, w], "mean": [0.0] * c, "std": [1.0] * c},
        "labels": [str(i) for i in range(sig.num_classes)],
        "max_batch_size": 1 if sig.batch == 1 else DEFAULT_MAX_BATCH_SIZE,
    }
    return ModelConfig.from_dict(data)


def complete_from_graph(model_dir: Path, boundary: Boundary = STRICT) -> ModelConfig:
    """The config of a model folder holding only ``<version>/model.onnx``, read from its latest graph."""
    path = boundary.check(latest_model_file(model_dir), Path(model_dir), "model file")
    return config_from_signature(Path(model_dir).name, read_signature(path, boundary))
