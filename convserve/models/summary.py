"""Parameter counts and FLOPs of every registered architecture, beside the seed's dense baseline.

The seed's point: an MLP with one 10k-unit hidden layer on 300×300 inputs already needs ~1e9 weights,
while convolutions share one small kernel across all positions, so their parameter count does not
grow with the image. Models are built on PyTorch's ``meta`` device and measured from shapes alone:
nothing is allocated or computed, so even VGG-16 is summarised in milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .layers import Conv2d
from .registry import build, get_architecture, list_architectures

__all__ = ["MLP_HIDDEN", "MLP_INPUT", "count_macs", "count_parameters", "format_table", "mlp_parameters",
           "summarize"]

MLP_INPUT = (300, 300)  # the seed's image size, one value per pixel
MLP_HIDDEN = 10_000
MLP_CLASSES = 1000


def count_parameters(model: nn.Module) -> int:
    """Number of learnable scalars (tied parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def mlp_parameters(inputs: int = MLP_INPUT[0] * MLP_INPUT[1], hidden: int = MLP_HIDDEN,
                   classes: int = MLP_CLASSES) -> int:
    """Weights and biases of a one-hidden-layer MLP: inputs→hidden→classes."""
    return inputs * hidden + hidden + hidden * classes + classes


def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one forward pass on one (C, H, W) image, from our Conv2d and nn.Linear
    layers (the rest — BatchNorm, activations, pooling — is a rounding error next to them).

    Runs the model on the ``meta`` device when its parameters live there, so shapes flow without compute.
    """
    device = next(model.parameters()).device
    macs = 0

    def conv_hook(module: Conv2d, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal macs
        kh, kw = module.kernel_size
        macs += output[0].numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal macs
        macs += output[0].numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return macs


def summarize(names: Iterable[str] | None = None, *, include_mlp: bool = True) -> list[dict[str, Any]]:
    """One row per architecture at its canonical input (plus the seed's MLP baseline first): name, input
    ``"CxHxW"``, classes, params, MACs, FLOPs (= 2 × MACs) and params as a fraction of the MLP's."""
    mlp = mlp_parameters()
    rows: list[dict[str, Any]] = []
    if include_mlp:
        h, w = MLP_INPUT
        macs = h * w * MLP_HIDDEN + MLP_HIDDEN * MLP_CLASSES
        rows.append(_row("mlp-10k", f"1x{h}x{w}", MLP_CLASSES, mlp, macs, mlp,
                         f"seed's baseline: {h}x{w} pixels -> {MLP_HIDDEN} hidden -> {MLP_CLASSES}"))
    for name in list_architectures() if names is None else names:
        arch = get_architecture(name)
        shape = (arch.in_channels, *arch.input_size)
        with torch.device("meta"):
            model = build(name)
        rows.append(_row(name, "x".join(map(str, shape)), arch.num_classes, count_parameters(model),
                         count_macs(model, shape), mlp, arch.description))
    return rows


def _row(name: str, shape: str, classes: int, params: int, macs: int, mlp: int, description: str) -> dict:
    return {"name": name, "input": shape, "classes": classes, "params": params, "macs": macs,
            "flops": 2 * macs, "params_vs_mlp": params / mlp, "description": description}


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of ``summarize()`` rows, params and FLOPs in human units."""
    header = ("architecture", "input", "classes", "params", "GFLOPs", "params vs MLP")
    lines = [tuple(header)]
    for r in rows:
        gflops, share = f"{r['flops'] / 1e9:.3f}", f"{100 * r['params_vs_mlp']:.3g}%"
        lines.append((r["name"], r["input"], str(r["classes"]), _human(r["params"]), gflops, share))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def fmt(line: tuple[str, ...]) -> str:  # text columns left-aligned, numbers right-aligned
        cells = zip(line, widths, strict=True)
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(cells)).rstrip()

    out = [fmt(line) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.append("")
    out.append(f"FLOPs = 2 x multiply-accumulates of one image. The MLP row is the seed's dense baseline "
               f"({_human(mlp_parameters())} weights); a conv layer's weights do not grow with the image.")
    return "\n".join(out)


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
