"""Pieces every architecture shares: channel scaling, conv-BN-ReLU, global pooling and size bookkeeping."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..layers import AvgPool2d, Conv2d


def scaled(channels: int, width: float, divisor: int = 1) -> int:
    """``channels * width`` rounded to a multiple of ``divisor`` (at least one divisor)."""
    return max(divisor, round(channels * width / divisor) * divisor)


def conv_bn_act(in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int | None = None,
                groups: int = 1, act: bool = True) -> nn.Sequential:
    """Conv (no bias: BatchNorm has one) → BatchNorm → ReLU; padding defaults to 'same' for odd kernels."""
    pad = kernel // 2 if padding is None else padding
    layers: list[nn.Module] = [Conv2d(in_ch, out_ch, kernel, stride, pad, groups=groups, bias=False),
                               nn.BatchNorm2d(out_ch)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def spatial_size(modules: Iterable[nn.Module], hw: tuple[int, int]) -> tuple[int, int]:
    """(H, W) after ``modules`` act, in order, on an (H, W) input — computed, not run.

    A module that knows its geometry (our Conv2d and pools, and blocks with parallel branches such as a
    residual or inception block) answers through ``output_size``; other containers are walked in order;
    everything else (activations, BatchNorm, dropout) keeps the size. Raises ValueError when a window no
    longer fits, which is how builders reject inputs too small for their network.
    """
    for module in modules:
        if hasattr(module, "output_size"):
            hw = module.output_size(hw)
            if min(hw) < 1:
                raise ValueError("input too small for this network: a conv or pool window no longer fits")
        else:
            hw = spatial_size(module.children(), hw)
    return hw


def global_avg_pool(hw: tuple[int, int]) -> AvgPool2d:
    """Average pooling over the whole (H, W) feature map, which is fixed once the input size is: a global
    pool built from our own layer (exports as one ONNX AveragePool)."""
    return AvgPool2d(hw)


def init_weights(model: nn.Module) -> nn.Module:
    """He (fan-out) initialisation for every convolution, zero biases, unit BatchNorm — what deep plain
    stacks need: with torch.nn's default conv init, VGG-16's first-layer gradients vanish to ~1e-7."""
    for module in model.modules():
        if isinstance(module, Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model
