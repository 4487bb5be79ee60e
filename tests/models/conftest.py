"""The seed's loop implementations of convolution and pooling, kept here as the independent reference.

They generalise the seed's two loops (one output pixel = one window of the input) to batches, channels,
stride, padding, dilation and groups, and stay deliberately naive: one Python iteration per output pixel.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor


def conv2d_loop(x: Tensor, k: Tensor, bias: Tensor | None = None, stride=(1, 1), padding=(0, 0),
                dilation=(1, 1), groups: int = 1) -> Tensor:
    """Y[n, o, i, j] = sum over the window of X * K — the seed's ``(X[i:i+h, j:j+w] * K).sum()``."""
    n, c, _, _ = x.shape
    o, cg, h, w = k.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    xp = torch.zeros((n, c, x.shape[2] + 2 * ph, x.shape[3] + 2 * pw), dtype=x.dtype)
    xp[:, :, ph : ph + x.shape[2], pw : pw + x.shape[3]] = x
    oh = (xp.shape[2] - dh * (h - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (w - 1) - 1) // sw + 1
    y = torch.zeros((n, o, oh, ow), dtype=x.dtype)
    per_group = o // groups
    for oc in range(o):
        g = oc // per_group
        for i in range(oh):
            for j in range(ow):
                window = xp[:, g * cg : (g + 1) * cg,
                            i * sh : i * sh + dh * (h - 1) + 1 : dh,
                            j * sw : j * sw + dw * (w - 1) + 1 : dw]
                y[:, oc, i, j] = (window * k[oc]).sum(dim=(1, 2, 3))
    if bias is not None:
        y = y + bias.view(1, o, 1, 1)
    return y


def pool2d_loop(x: Tensor, kernel=(2, 2), stride=None, padding=(0, 0), mode: str = "max",
                count_include_pad: bool = True) -> Tensor:
    """Max or mean of each window — the seed's pooling loop; padding is -inf for max, zeros for mean."""
    h, w = kernel
    sh, sw = stride or kernel
    ph, pw = padding
    n, c = x.shape[:2]
    fill = float("-inf") if mode == "max" else 0.0
    xp = torch.full((n, c, x.shape[2] + 2 * ph, x.shape[3] + 2 * pw), fill, dtype=x.dtype)
    xp[:, :, ph : ph + x.shape[2], pw : pw + x.shape[3]] = x
    real = torch.zeros(xp.shape[2:], dtype=x.dtype)
    real[ph : ph + x.shape[2], pw : pw + x.shape[3]] = 1
    oh, ow = (xp.shape[2] - h) // sh + 1, (xp.shape[3] - w) // sw + 1
    y = torch.zeros((n, c, oh, ow), dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            window = xp[:, :, i * sh : i * sh + h, j * sw : j * sw + w]
            if mode == "max":
                y[:, :, i, j] = window.amax(dim=(2, 3))
            else:
                count = h * w if count_include_pad else real[i * sh : i * sh + h, j * sw : j * sw + w].sum()
                y[:, :, i, j] = window.sum(dim=(2, 3)) / count
    return y


@pytest.fixture(scope="session")
def conv_loop():
    """The loop convolution reference (session-scoped, so hypothesis tests can use it)."""
    return conv2d_loop


@pytest.fixture(scope="session")
def pool_loop():
    """The loop pooling reference."""
    return pool2d_loop
