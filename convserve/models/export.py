"""ONNX export with a self-check against PyTorch, and the atomic write of a model repository entry.

An entry is ``<repository>/<name>/config.json`` plus ``<repository>/<name>/<version>/model.onnx``. Nothing
is written until the graph has passed ``onnx.checker`` and ONNX Runtime has reproduced the PyTorch output;
the files are then assembled in a hidden temporary folder on the same filesystem and moved into place
with ``os.rename`` (server/model_entry.py), so a reader never sees a half-written entry.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from convserve.common.model_config import MODEL_FILE, ModelConfig, ModelConfigError
from convserve.common.model_entry import EntryWriteError, check_writable, next_version, write_entry

from .functional import ONNX_OPSET, onnx_translation_table
from .layers import Conv2d

__all__ = [
    "STANDARD_DOMAINS",
    "ExportError",
    "Verification",
    "export_model",
    "export_onnx_bytes",
    "next_version",
    "verify_onnx",
]

# ONNX's default operator set; "ai.onnx" is its explicit spelling. Anything else is a custom domain.
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
TOLERANCE = 1e-4
VERIFY_BATCH = 3
# A Dim's name becomes the graph's symbolic batch dimension.
BATCH_DIM = "batch"
METHODS = ("dynamo", "torchscript")

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The model could not be exported, failed its self-check, or the entry could not be written."""


@dataclass(frozen=True)
class Verification:
    """What the self-check measured: the batch it ran, the largest |ONNX Runtime − PyTorch| gap and the
    largest |PyTorch output|."""

    batch: int
    max_abs_diff: float
    max_abs_output: float  # the scale the difference is judged against
    nodes: int


def export_onnx_bytes(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    *,
    input_name: str = "input",
    output_name: str = "logits",
    opset: int = ONNX_OPSET,
    method: str = "dynamo",
    fold_batchnorm: bool = True,
) -> bytes:
    """Serialize ``model`` (evaluated in eval mode, on CPU) to an ONNX model with a dynamic batch dimension.

    ``input_shape`` is (C, H, W). ``method`` picks torch.onnx's exporter: ``"dynamo"`` (torch.export + the
    onnxscript translations of our custom ops; the default) or ``"torchscript"`` (the legacy tracer with
    symbolic functions). Weights are embedded in the returned bytes. The model itself is not touched: a
    copy is exported, with each BatchNorm folded into the convolution before it (``fold_batchnorm``):
    the exporter's optimizer folds them anyway, so the graph is the same, but tracing does about half the
    work (inception: ~9 s → ~4 s of CPU). Raises ExportError.
    """
    if method not in METHODS:
        raise ExportError(f"unknown export method {method!r}; choose one of {METHODS}")
    # Batch 2: torch.export specialises sizes 0 and 1, so an example of 1 would freeze the batch dim.
    example = torch.zeros((2, *input_shape), dtype=torch.float32)
    try:
        with _quiet_exporter(), torch.no_grad():
            model = _exportable_copy(model, fold_batchnorm)
            if method == "dynamo":
                program = torch.onnx.export(
                    model, (example,), dynamo=True, opset_version=opset, verbose=False,
                    input_names=[input_name], output_names=[output_name],
                    dynamic_shapes=({0: torch.export.Dim(BATCH_DIM, min=1, max=65536)},),
                    custom_translation_table=onnx_translation_table(), optimize=True,
                )
                return program.model_proto.SerializeToString()
            return _export_torchscript(model, example, input_name, output_name, opset)
    except ExportError:
        raise
    except Exception as exc:  # the exporters raise many unrelated types; one message for the user
        raise ExportError(
            f"torch.onnx.export ({method}) failed: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc


def _export_torchscript(model: nn.Module, example: torch.Tensor, input_name: str, output_name: str,
                        opset: int) -> bytes:
    import io

    from .functional import register_torchscript_symbolics

    register_torchscript_symbolics(opset)
    buffer = io.BytesIO()
    torch.onnx.export(
        model, (example,), buffer, dynamo=False, opset_version=opset, input_names=[input_name],
        output_names=[output_name], dynamic_axes={input_name: {0: BATCH_DIM}, output_name: {0: BATCH_DIM}},
        do_constant_folding=True,
    )
    return buffer.getvalue()


def verify_onnx(
    model: nn.Module,
    onnx_bytes: bytes,
    input_shape: tuple[int, int, int],
    *,
    input_name: str = "input",
    output_name: str = "logits",
    batch: int = VERIFY_BATCH,
    tolerance: float = TOLERANCE,
    num_classes: int | None = None,
    seed: int = 0,
) -> Verification:
    """Check the exported graph: onnx.checker passes, only standard-domain ops, the named input has a
    symbolic batch dim and shape (C, H, W), and ONNX Runtime matches PyTorch within ``tolerance`` on a
    random batch (a batch size other than the export example's, so a frozen batch dim is caught).
    Raises ExportError saying which check failed."""
    import onnx
    import onnxruntime as ort

    try:
        proto = onnx.load_from_string(onnx_bytes)
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"exported graph fails onnx.checker: {_first_line(exc)}") from exc
    nodes = list(_all_nodes(proto.graph))
    custom = sorted({f"{n.domain}::{n.op_type}" for n in nodes if n.domain not in STANDARD_DOMAINS})
    if custom:
        raise ExportError(f"exported graph uses non-standard ops {custom}; only standard ONNX is allowed")
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if [i.name for i in inputs] != [input_name] or [o.name for o in proto.graph.output] != [output_name]:
        raise ExportError(f"exported graph has inputs {[i.name for i in inputs]} and outputs "
                          f"{[o.name for o in proto.graph.output]}; "
                          f"expected [{input_name!r}] and [{output_name!r}]")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not dims[0].dim_param or [d.dim_value for d in dims[1:]] != list(input_shape):
        shown = [d.dim_param or d.dim_value for d in dims]
        raise ExportError(f"exported input {input_name!r} has shape {shown}; expected "
                          f"[batch, {', '.join(map(str, input_shape))}] with a symbolic batch dimension")

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *input_shape), generator=generator)
    with _inference_mode(model) as cpu_model, torch.no_grad():
        expected = cpu_model(x).numpy()
    try:
        session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        (got,) = session.run([output_name], {input_name: x.numpy()})
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot run the exported graph: {_first_line(exc)}") from exc
    if got.shape != expected.shape:
        raise ExportError(f"ONNX Runtime output shape {got.shape} differs from PyTorch's {expected.shape}")
    if num_classes is not None and expected.shape[-1] != num_classes:
        raise ExportError(
            f"model emits {expected.shape[-1]} classes but the config lists {num_classes} labels"
        )
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    # allclose semantics (|ort - torch| <= tol + tol * |torch|): float32 carries ~7 digits, so two correct
    # kernels already differ by ~1e-5 on logits in the hundreds; small logits get the absolute bound.
    close = np.allclose(got, expected, rtol=tolerance, atol=tolerance)
    if not np.isfinite(diff) or not close:
        raise ExportError(f"ONNX Runtime output differs from PyTorch by {diff:.3g} "
                          f"(allowed {tolerance:g} + {tolerance:g} x |output|) "
                          f"on a random batch of {batch}")
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    return Verification(batch=batch, max_abs_diff=diff, max_abs_output=scale, nodes=len(nodes))


def export_model(
    model: nn.Module,
    cfg: ModelConfig,
    repository: Path,
    version: int | None = None,
    force: bool = False,
    *,
    method: str = "dynamo",
) -> Path:
    """Export ``model`` as ``<repository>/<cfg.name>/<version>/model.onnx`` with ``config.json`` beside the
    version folders; returns the model.onnx path.

    ``version=None`` takes the next free number; an existing version is replaced only with ``force``.
    Raises ExportError (bad config, export or self-check failure, existing version, unwritable
    repository) and then leaves the repository exactly as it was.
    """
    try:
        cfg = cfg.validate()
    except ModelConfigError as exc:
        raise ExportError(str(exc)) from None
    if version is not None and (isinstance(version, bool) or version < 1):
        raise ExportError(f"version must be a positive integer, got {version!r}")
    repository = Path(repository)
    model_dir = repository / cfg.name
    try:
        check_writable(repository)
    except EntryWriteError as exc:
        raise ExportError(str(exc)) from None
    version = next_version(model_dir) if version is None else int(version)
    target = model_dir / str(version)
    if target.exists() and not force:
        raise ExportError(f"{target} already exists; pass force to replace it or choose another version")

    shape = tuple(int(d) for d in cfg.input.shape)
    onnx_bytes = export_onnx_bytes(model, shape, input_name=cfg.input.name, output_name=cfg.output.name,
                                   method=method)
    check = verify_onnx(model, onnx_bytes, shape, input_name=cfg.input.name, output_name=cfg.output.name,
                        num_classes=cfg.num_classes)
    log.info("exported %s v%d: %d nodes, %.1f KiB, max |ort - torch| = %.2g", cfg.name, version, check.nodes,
             len(onnx_bytes) / 1024, check.max_abs_diff)
    try:
        write_entry(model_dir, version, onnx_bytes, cfg)
    except OSError as exc:
        raise ExportError(f"cannot write model entry under {repository}: {exc.strerror or exc}") from None
    return target / MODEL_FILE


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _all_nodes(graph) -> Iterator:
    """Every node, including those inside subgraphs (If/Loop bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)


def _exportable_copy(model: nn.Module, fold_batchnorm: bool) -> nn.Module:
    """An eval-mode CPU copy for tracing: BatchNorm folded into the preceding Conv2d, in-place activations
    made out-of-place (the same function; in-place ops only cost functionalization work while tracing)."""
    model = copy.deepcopy(model).to("cpu").eval()
    for module in model.modules():
        if isinstance(module, (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish)) and module.inplace:
            module.inplace = False
        if fold_batchnorm and isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (_, conv), (bn_name, bn) in itertools.pairwise(children):
                if isinstance(conv, Conv2d) and _foldable(bn, conv.out_channels):
                    _fold_into(conv, bn)
                    setattr(module, bn_name, nn.Identity())
    return model


def _foldable(bn: nn.Module, channels: int) -> bool:
    return (isinstance(bn, nn.BatchNorm2d) and bn.num_features == channels and bn.running_mean is not None
            and bn.running_var is not None)


def _fold_into(conv: Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv ∘ bn as one conv: w' = w·s, b' = (b − μ)·s + β with s = γ / √(σ² + ε), per output channel."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.affine:
        scale = scale * bn.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    shift = (bias - bn.running_mean.double()) * scale
    if bn.affine:
        shift = shift + bn.bias.double()
    conv.weight = nn.Parameter((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    conv.bias = nn.Parameter(shift.to(conv.weight.dtype))


@contextlib.contextmanager
def _inference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode on CPU; every submodule's training flag is restored afterwards, so exporting
    a model mid-training changes nothing. A model on another device is copied, never moved."""
    if any(t.device.type != "cpu" for t in [*model.parameters(), *model.buffers()]):
        model = copy.deepcopy(model).to("cpu")
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx logs and warns about things (e.g. torchvision absent) that say nothing about our graph."""
    names = ("torch.onnx._internal.exporter._registration", "torch.onnx._internal.exporter._core")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # torch's own pytree deprecation (LeafSpec) and the legacy tracer's notes on our shape checks,
            # which run once on static shapes and never become part of the graph.
            warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            # Choosing the legacy exporter is deliberate when method="torchscript".
            warnings.filterwarnings("ignore", ".*legacy TorchScript-based ONNX export", DeprecationWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\..*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
