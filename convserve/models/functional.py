"""conv2d / max_pool2d / avg_pool2d via unfold + matmul, as custom ops that export to standard ONNX ops.

The seed computes a convolution output as the sum of an elementwise product of a k×k input window with a
shared kernel (cross-correlation), and pooling as the max or mean of each window. Here every window of a
batch is gathered at once with ``unfold`` (im2col), so the work is one batched matmul or one reduction —
no Python loop over pixels. Backward passes are written out with ``fold`` (col2im), the adjoint of unfold.

Each op is a ``torch.library`` custom operator in the ``convserve`` namespace with a fake kernel (shape
propagation for tracing/export) and an autograd formula. ``onnx_translation_table()`` maps each op to an
onnxscript function emitting the standard ONNX ``Conv`` / ``MaxPool`` / ``AveragePool`` for the dynamo
exporter, and ``register_torchscript_symbolics()`` does the same for the legacy one, so an exported graph
holds only standard-domain ops and ONNX Runtime runs its own optimized kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ONNX_OPSET", "avg_pool2d", "conv2d", "max_pool2d", "onnx_translation_table", "output_hw",
           "register_torchscript_symbolics"]

ONNX_OPSET = 18

IntPair = int | Sequence[int]


def _pair(value: IntPair, name: str) -> list[int]:
    """Normalise an int or a 2-sequence to a list of two ints."""
    if isinstance(value, int):
        return [value, value]
    items = [int(v) for v in value]
    if len(items) == 1:
        return items * 2
    if len(items) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return items


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _out_hw(
    x_shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, int]:
    h = _out_size(x_shape[-2], kernel[0], stride[0], padding[0], dilation[0])
    w = _out_size(x_shape[-1], kernel[1], stride[1], padding[1], dilation[1])
    return h, w


def output_hw(
    hw: Sequence[int], kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int] = (1, 1),
) -> tuple[int, int]:
    """Output (H, W) of a convolution or pooling window over an (H, W) input (floor mode)."""
    return _out_hw(tuple(hw), kernel, stride, padding, dilation)


# --------------------------------------------------------------------------------------------- conv2d


def _conv2d_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
    dilation: list[int], groups: int,
) -> Tensor:
    n = x.shape[0]
    o, cg, kh, kw = weight.shape
    oh, ow = _out_hw(x.shape, (kh, kw), stride, padding, dilation)
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, C*kh*kw, L)
    cols = cols.view(n, groups, cg * kh * kw, oh * ow)  # (N, G, C/G*kh*kw, L)
    w = weight.reshape(groups, o // groups, cg * kh * kw)  # (G, O/G, C/G*kh*kw)
    out = torch.matmul(w, cols)  # (N, G, O/G, L): one window·kernel dot product per output pixel
    out = out.reshape(n, o, oh, ow)
    if bias is not None:
        out = out + bias.view(1, o, 1, 1)
    return out


@torch.library.custom_op("convserve::conv2d", mutates_args=())
def _conv2d_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
    dilation: list[int], groups: int,
) -> Tensor:
    return _conv2d_forward(x, weight, bias, stride, padding, dilation, groups)


@_conv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):
    oh, ow = _out_hw(x.shape, weight.shape[-2:], stride, padding, dilation)
    return x.new_empty((x.shape[0], weight.shape[0], oh, ow))


def _conv2d_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.conf = (stride, padding, dilation, groups)


def _conv2d_backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conf
    n, c, h, w_in = x.shape
    o, cg, kh, kw = weight.shape
    grad = grad.contiguous()
    g = grad.view(n, groups, o // groups, -1)  # (N, G, O/G, L)
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        w = weight.reshape(groups, o // groups, cg * kh * kw)
        dcols = torch.matmul(w.transpose(1, 2), g).reshape(n, c * kh * kw, -1)  # (N, C*kh*kw, L)
        grad_x = F.fold(dcols, (h, w_in), (kh, kw), dilation=dilation, padding=padding, stride=stride)
    if ctx.needs_input_grad[1]:
        cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
        cols = cols.view(n, groups, cg * kh * kw, -1)  # (N, G, C/G*kh*kw, L)
        grad_w = torch.matmul(g, cols.transpose(2, 3)).sum(0).reshape(o, cg, kh, kw)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad.sum((0, 2, 3))
    return grad_x, grad_w, grad_b, None, None, None, None


_conv2d_op.register_autograd(_conv2d_backward, setup_context=_conv2d_setup)


def conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: IntPair = 1, padding: IntPair = 0,
    dilation: IntPair = 1, groups: int = 1,
) -> Tensor:
    """2-D cross-correlation of ``x`` (N, C, H, W) with ``weight`` (O, C/groups, kh, kw); same contract as
    ``torch.nn.functional.conv2d`` for numeric padding. Raises ValueError on inconsistent shapes."""
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    dilation = _pair(dilation, "dilation")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"conv2d expects 4-D input and weight, got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    c = x.shape[1]
    if groups < 1 or c % groups or weight.shape[0] % groups or c // groups != weight.shape[1]:
        raise ValueError(
            f"conv2d: input has {x.shape[1]} channels, weight {tuple(weight.shape)} and groups={groups} "
            "do not match (need C % groups == 0, O % groups == 0, weight.shape[1] == C // groups)"
        )
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(
            f"conv2d: need stride, dilation >= 1 and padding >= 0, got {stride}, {dilation}, {padding}"
        )
    if min(_out_hw(x.shape, weight.shape[-2:], stride, padding, dilation)) < 1:
        raise ValueError(
            f"conv2d: kernel {tuple(weight.shape[-2:])} does not fit input {tuple(x.shape[-2:])}"
        )
    return _conv2d_op(x, weight, bias, stride, padding, dilation, groups)


# --------------------------------------------------------------------------------------------- pooling


def _windows(x: Tensor, kernel: list[int], stride: list[int], dilation: list[int]) -> Tensor:
    """All pooling windows of an already padded x as (N, C, kh*kw, L)."""
    n, c = x.shape[:2]
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (N, C*kh*kw, L)
    return cols.view(n, c, kernel[0] * kernel[1], -1)


def _fold_windows(
    dwin: Tensor, padded_hw: tuple[int, int], kernel: list[int], stride: list[int], dilation: list[int],
    padding: list[int],
) -> Tensor:
    """Adjoint of padding + _windows: scatter-add window gradients back and crop the padding."""
    n, c = dwin.shape[:2]
    out = F.fold(dwin.reshape(n, c * kernel[0] * kernel[1], -1), padded_hw, kernel, dilation=dilation,
                 stride=stride)
    ph, pw = padding
    return out[:, :, ph : padded_hw[0] - ph, pw : padded_hw[1] - pw]


def _max_pool2d_forward(x, kernel, stride, padding, dilation) -> Tensor:
    n, c = x.shape[:2]
    oh, ow = _out_hw(x.shape, kernel, stride, padding, dilation)
    ph, pw = padding
    # Pad with -inf so a padded position never wins the max (what ONNX MaxPool and torch do).
    xp = F.pad(x, (pw, pw, ph, ph), value=float("-inf"))
    return _windows(xp, kernel, stride, dilation).amax(dim=2).view(n, c, oh, ow)


@torch.library.custom_op("convserve::max_pool2d", mutates_args=())
def _max_pool2d_op(
    x: Tensor, kernel: list[int], stride: list[int], padding: list[int], dilation: list[int]
) -> Tensor:
    return _max_pool2d_forward(x, kernel, stride, padding, dilation)


@_max_pool2d_op.register_fake
def _(x, kernel, stride, padding, dilation):
    oh, ow = _out_hw(x.shape, kernel, stride, padding, dilation)
    return x.new_empty((x.shape[0], x.shape[1], oh, ow))


def _max_pool2d_setup(ctx, inputs, output):
    x, kernel, stride, padding, dilation = inputs
    ctx.save_for_backward(x)
    ctx.conf = (kernel, stride, padding, dilation)


def _max_pool2d_backward(ctx, grad: Tensor):
    (x,) = ctx.saved_tensors
    kernel, stride, padding, dilation = ctx.conf
    ph, pw = padding
    xp = F.pad(x, (pw, pw, ph, ph), value=float("-inf"))
    win = _windows(xp, kernel, stride, dilation)  # (N, C, kh*kw, L)
    # The first maximal element of each window takes the gradient, as torch.nn.functional.max_pool2d does.
    idx = win.argmax(dim=2, keepdim=True)  # (N, C, 1, L)
    dwin = torch.zeros_like(win).scatter_(2, idx, grad.reshape(idx.shape))
    grad_x = _fold_windows(dwin, tuple(xp.shape[-2:]), kernel, stride, dilation, padding)
    return grad_x, None, None, None, None


_max_pool2d_op.register_autograd(_max_pool2d_backward, setup_context=_max_pool2d_setup)


def _avg_divisor(x: Tensor, kernel, stride, padding, count_include_pad: bool) -> Tensor | float:
    """What each window's sum is divided by: the full window, or only its non-padding part."""
    if count_include_pad or padding == [0, 0]:
        return float(kernel[0] * kernel[1])
    ones = torch.ones((1, 1, *x.shape[-2:]), dtype=x.dtype, device=x.device)
    ph, pw = padding
    ones = F.pad(ones, (pw, pw, ph, ph))
    return _windows(ones, kernel, stride, [1, 1]).sum(dim=2, keepdim=True)  # (1, 1, 1, L)


def _avg_pool2d_forward(x, kernel, stride, padding, count_include_pad) -> Tensor:
    n, c = x.shape[:2]
    oh, ow = _out_hw(x.shape, kernel, stride, padding, [1, 1])
    ph, pw = padding
    win = _windows(F.pad(x, (pw, pw, ph, ph)), kernel, stride, [1, 1])  # (N, C, kh*kw, L)
    out = win.sum(dim=2, keepdim=True) / _avg_divisor(x, kernel, stride, padding, count_include_pad)
    return out.view(n, c, oh, ow)


@torch.library.custom_op("convserve::avg_pool2d", mutates_args=())
def _avg_pool2d_op(
    x: Tensor, kernel: list[int], stride: list[int], padding: list[int], count_include_pad: bool
) -> Tensor:
    return _avg_pool2d_forward(x, kernel, stride, padding, count_include_pad)


@_avg_pool2d_op.register_fake
def _(x, kernel, stride, padding, count_include_pad):
    oh, ow = _out_hw(x.shape, kernel, stride, padding, [1, 1])
    return x.new_empty((x.shape[0], x.shape[1], oh, ow))


def _avg_pool2d_setup(ctx, inputs, output):
    x, kernel, stride, padding, count_include_pad = inputs
    ctx.x_shape = tuple(x.shape)
    ctx.save_for_backward(x)
    ctx.conf = (kernel, stride, padding, count_include_pad)


def _avg_pool2d_backward(ctx, grad: Tensor):
    (x,) = ctx.saved_tensors
    kernel, stride, padding, count_include_pad = ctx.conf
    n, c, h, w = x.shape
    ph, pw = padding
    per_window = grad.reshape(n, c, 1, -1) / _avg_divisor(x, kernel, stride, padding, count_include_pad)
    dwin = per_window.expand(n, c, kernel[0] * kernel[1], per_window.shape[-1])
    grad_x = _fold_windows(dwin, (h + 2 * ph, w + 2 * pw), kernel, stride, [1, 1], padding)
    return grad_x, None, None, None, None


_avg_pool2d_op.register_autograd(_avg_pool2d_backward, setup_context=_avg_pool2d_setup)


def _pool_args(
    x: Tensor, kernel_size: IntPair, stride: IntPair | None, padding: IntPair, dilation: IntPair, name: str
) -> tuple[list[int], list[int], list[int], list[int]]:
    kernel = _pair(kernel_size, "kernel_size")
    # torch.nn.functional takes an empty stride to mean "the kernel size" too.
    no_stride = stride is None or (not isinstance(stride, int) and len(stride) == 0)
    stride_ = kernel if no_stride else _pair(stride, "stride")
    padding_, dilation_ = _pair(padding, "padding"), _pair(dilation, "dilation")
    if x.dim() != 4:
        raise ValueError(f"{name} expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    if min(kernel) < 1 or min(stride_) < 1 or min(dilation_) < 1:
        raise ValueError(
            f"{name}: kernel, stride and dilation must be >= 1, got {kernel}, {stride_}, {dilation_}"
        )
    if any(p < 0 or 2 * p > k for p, k in zip(padding_, kernel, strict=True)):
        raise ValueError(
            f"{name}: padding must be between 0 and half the kernel, got {padding_} for {kernel}"
        )
    if min(_out_hw(x.shape, kernel, stride_, padding_, dilation_)) < 1:
        raise ValueError(f"{name}: window {kernel} does not fit input {tuple(x.shape[-2:])}")
    return kernel, stride_, padding_, dilation_


def max_pool2d(
    x: Tensor, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0,
    dilation: IntPair = 1,
) -> Tensor:
    """Max of each (dilated) kernel window of ``x`` (N, C, H, W); stride defaults to the kernel size.
    Padding counts as -inf, as in ``torch.nn.functional.max_pool2d`` (floor mode)."""
    kernel, stride_, padding_, dilation_ = _pool_args(x, kernel_size, stride, padding, dilation, "max_pool2d")
    return _max_pool2d_op(x, kernel, stride_, padding_, dilation_)


def avg_pool2d(
    x: Tensor, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0,
    count_include_pad: bool = True,
) -> Tensor:
    """Mean of each kernel window of ``x`` (N, C, H, W); stride defaults to the kernel size. Zero padding
    counts in the divisor unless ``count_include_pad`` is False (as torch's avg_pool2d, floor mode)."""
    kernel, stride_, padding_, _ = _pool_args(x, kernel_size, stride, padding, 1, "avg_pool2d")
    return _avg_pool2d_op(x, kernel, stride_, padding_, bool(count_include_pad))


# --------------------------------------------------------------------------------------------- ONNX


def onnx_translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: each custom op becomes the
    standard ONNX op (opset 18). onnxscript is imported here so that training needs no ONNX packages."""
    from onnxscript import opset18 as op

    def conv2d_onnx(x, weight, bias, stride, padding, dilation, groups):
        pads = [padding[0], padding[1], padding[0], padding[1]]  # ONNX: all begins, then all ends
        if bias is None:
            return op.Conv(x, weight, strides=stride, pads=pads, dilations=dilation, group=groups)
        return op.Conv(x, weight, bias, strides=stride, pads=pads, dilations=dilation, group=groups)

    def max_pool2d_onnx(x, kernel, stride, padding, dilation):
        pads = [padding[0], padding[1], padding[0], padding[1]]
        # MaxPool always has an optional Indices output here; export drops it when unused.
        y, _indices = op.MaxPool(x, kernel_shape=kernel, strides=stride, pads=pads, dilations=dilation)
        return y

    def avg_pool2d_onnx(x, kernel, stride, padding, count_include_pad):
        pads = [padding[0], padding[1], padding[0], padding[1]]
        return op.AveragePool(x, kernel_shape=kernel, strides=stride, pads=pads,
                              count_include_pad=1 if count_include_pad else 0)

    return {
        torch.ops.convserve.conv2d.default: conv2d_onnx,
        torch.ops.convserve.max_pool2d.default: max_pool2d_onnx,
        torch.ops.convserve.avg_pool2d.default: avg_pool2d_onnx,
    }


def register_torchscript_symbolics(opset: int = ONNX_OPSET) -> None:
    """Teach the legacy TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) the same standard
    ONNX translations. Idempotent: registering again replaces the previous symbolic functions."""
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx import symbolic_helper as sh

    def pads(padding: list[int]) -> list[int]:
        return [padding[0], padding[1], padding[0], padding[1]]

    @sh.parse_args("v", "v", "v", "is", "is", "is", "i")
    def conv2d_symbolic(g, x, weight, bias, stride, padding, dilation, groups):
        inputs = [x, weight] if sh._is_none(bias) else [x, weight, bias]
        return g.op("Conv", *inputs, strides_i=stride, pads_i=pads(padding), dilations_i=dilation,
                    group_i=groups)

    @sh.parse_args("v", "is", "is", "is", "is")
    def max_pool2d_symbolic(g, x, kernel, stride, padding, dilation):
        return g.op("MaxPool", x, kernel_shape_i=kernel, strides_i=stride, pads_i=pads(padding),
                    dilations_i=dilation)

    @sh.parse_args("v", "is", "is", "is", "b")
    def avg_pool2d_symbolic(g, x, kernel, stride, padding, count_include_pad):
        return g.op("AveragePool", x, kernel_shape_i=kernel, strides_i=stride, pads_i=pads(padding),
                    count_include_pad_i=int(count_include_pad))

    register_custom_op_symbolic("convserve::conv2d", conv2d_symbolic, opset)
    register_custom_op_symbolic("convserve::max_pool2d", max_pool2d_symbolic, opset)
    register_custom_op_symbolic("convserve::avg_pool2d", avg_pool2d_symbolic, opset)
