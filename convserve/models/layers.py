"""Conv2d, MaxPool2d and AvgPool2d modules over ``convserve.models.functional`` (drop-ins for torch.nn's)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import functional as cf
from .functional import IntPair, _pair

__all__ = ["AvgPool2d", "Conv2d", "MaxPool2d", "Pool2d"]


class Conv2d(nn.Module):
    """2-D convolution (cross-correlation) with a shared kernel: the seed's locality + translation priors.

    Takes ``torch.nn.Conv2d``'s constructor arguments and initialises weight and bias the same way, so a
    network written for torch.nn trains the same with this layer. Only zero padding (numeric, or
    ``"valid"``/``"same"`` for stride 1) is supported — the only mode ONNX ``Conv`` expresses directly.
    The parameter count, ``out * in/groups * kh * kw (+ out)``, does not depend on the input size.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair | str = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be "
                             f"divisible by groups ({groups})")
        if padding_mode != "zeros":
            raise ValueError(f"only padding_mode='zeros' is supported, got {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = tuple(_pair(kernel_size, "kernel_size"))
        self.stride = tuple(_pair(stride, "stride"))
        self.dilation = tuple(_pair(dilation, "dilation"))
        self.padding = self._resolve_padding(padding)
        self.padding_mode = padding_mode
        factory = {"device": device, "dtype": dtype}
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def _resolve_padding(self, padding: IntPair | str) -> tuple[int, int]:
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            if self.stride != (1, 1):
                raise ValueError("padding='same' needs stride 1")
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size, strict=True)]
            if any(t % 2 for t in total):
                raise ValueError(f"padding='same' with kernel {self.kernel_size} and dilation "
                                 f"{self.dilation} needs asymmetric padding, which this layer lacks")
            return (total[0] // 2, total[1] // 2)
        if isinstance(padding, str):
            raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
        return tuple(_pair(padding, "padding"))

    def reset_parameters(self) -> None:
        """Kaiming-uniform weight and fan-in-scaled bias, exactly as torch.nn.Conv2d does."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def output_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        """Output (H, W) for an (H, W) input: lets builders size their heads without a dry run."""
        return cf.output_hw(hw, self.kernel_size, self.stride, self.padding, self.dilation)

    def forward(self, x: Tensor) -> Tensor:
        return cf.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


class Pool2d(nn.Module):
    """Shared base of the pooling layers: a window (kernel, stride defaulting to the kernel, padding) whose
    values are reduced to one. No parameters, so nothing depends on the input size."""

    def __init__(self, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0,
                 ceil_mode: bool = False) -> None:
        super().__init__()
        if ceil_mode:
            raise ValueError("ceil_mode=True is not supported; pad the input or choose kernel/stride instead")
        self.kernel_size = tuple(_pair(kernel_size, "kernel_size"))
        self.stride = self.kernel_size if stride is None else tuple(_pair(stride, "stride"))
        self.padding = tuple(_pair(padding, "padding"))
        self.ceil_mode = ceil_mode

    def output_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        """Spatial size of the output for an (H, W) input."""
        dilation = getattr(self, "dilation", (1, 1))
        return cf.output_hw(hw, self.kernel_size, self.stride, self.padding, dilation)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(Pool2d):
    """Max of each window (the seed's ``mode == 'max'``): makes features tolerant to small shifts."""

    def __init__(self, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0,
                 dilation: IntPair = 1, return_indices: bool = False, ceil_mode: bool = False) -> None:
        super().__init__(kernel_size, stride, padding, ceil_mode)
        if return_indices:
            raise ValueError("return_indices=True is not supported")
        self.dilation = tuple(_pair(dilation, "dilation"))
        self.return_indices = return_indices

    def forward(self, x: Tensor) -> Tensor:
        return cf.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        extra = f", dilation={self.dilation}" if self.dilation != (1, 1) else ""
        return super().extra_repr() + extra


class AvgPool2d(Pool2d):
    """Mean of each window (the seed's ``mode == 'avg'``)."""

    def __init__(self, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0,
                 ceil_mode: bool = False, count_include_pad: bool = True,
                 divisor_override: int | None = None) -> None:
        super().__init__(kernel_size, stride, padding, ceil_mode)
        if divisor_override is not None:
            raise ValueError("divisor_override is not supported (ONNX AveragePool has no such attribute)")
        self.count_include_pad = count_include_pad
        self.divisor_override = divisor_override

    def forward(self, x: Tensor) -> Tensor:
        return cf.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.count_include_pad)

    def extra_repr(self) -> str:
        extra = "" if self.count_include_pad else ", count_include_pad=False"
        return super().extra_repr() + extra
