"""Conv2d / MaxPool2d / AvgPool2d modules: drop-ins for torch.nn's, and the seed's parameter-count prior."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convserve.models import AvgPool2d, Conv2d, MaxPool2d, Pool2d

CONV_ARGS = [
    dict(in_channels=3, out_channels=8, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 1), stride=(2, 1), padding=(1, 0), dilation=2,
         groups=2),
    dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8, bias=False),  # depthwise
    dict(in_channels=2, out_channels=4, kernel_size=5, padding="same"),
    dict(in_channels=2, out_channels=4, kernel_size=3, padding="valid"),
]


@pytest.mark.parametrize("kwargs", CONV_ARGS)
def test_conv2d_is_a_drop_in_for_torch_nn(kwargs):
    """Same constructor, same initialisation (same RNG draws), same parameter names, same outputs."""
    torch.manual_seed(0)
    ours = Conv2d(**kwargs)
    torch.manual_seed(0)
    ref = nn.Conv2d(**kwargs)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0)
    x = torch.randn(2, kwargs["in_channels"], 11, 10)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    ours(x).sum().backward()
    ref(x).sum().backward()
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("ours", "ref"),
    [
        (MaxPool2d(2), nn.MaxPool2d(2)),
        (MaxPool2d(3, stride=2, padding=1), nn.MaxPool2d(3, stride=2, padding=1)),
        (MaxPool2d((3, 2), stride=1, dilation=(1, 2)), nn.MaxPool2d((3, 2), stride=1, dilation=(1, 2))),
        (AvgPool2d(2), nn.AvgPool2d(2)),
        (AvgPool2d(3, stride=2, padding=1), nn.AvgPool2d(3, stride=2, padding=1)),
        (AvgPool2d(3, 1, 1, count_include_pad=False), nn.AvgPool2d(3, 1, 1, count_include_pad=False)),
    ],
)
def test_pooling_layers_are_drop_ins_for_torch_nn(ours, ref):
    assert isinstance(ours, Pool2d)
    x = torch.randn(2, 3, 9, 8, requires_grad=True)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(ours(x).square().sum(), x)
    (ref_grad,) = torch.autograd.grad(ref(x).square().sum(), x)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)
    assert ours.output_size((9, 8)) == tuple(ref(x).shape[-2:])
    assert not list(ours.parameters())


@pytest.mark.parametrize("size", [8, 16, 64, 128])
def test_parameter_count_does_not_depend_on_input_size(size):
    """The seed's other prior: a conv layer's weights are one shared kernel, whatever the image size."""
    layer = Conv2d(3, 16, 5, padding=2, groups=1)
    before = sum(p.numel() for p in layer.parameters())
    out = layer(torch.randn(1, 3, size, size))
    assert out.shape == (1, 16, size, size)
    assert before == sum(p.numel() for p in layer.parameters()) == 16 * 3 * 5 * 5 + 16
    assert layer.output_size((size, size)) == (size, size)


def test_depthwise_conv_has_one_filter_per_channel():
    layer = Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
    assert layer.weight.shape == (32, 1, 3, 3)
    x = torch.zeros(1, 32, 6, 6)
    x[:, 5] = 1.0  # only channel 5 is non-zero, so only output channel 5 may respond
    out = layer(x)
    assert out[:, 5].abs().sum() > 0
    assert out[:, [c for c in range(32) if c != 5]].abs().sum() == 0


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Conv2d(3, 4, 3, groups=2), "divisible by groups"),
        (lambda: Conv2d(3, 4, 3, padding_mode="reflect"), "padding_mode"),
        (lambda: Conv2d(3, 4, 3, stride=2, padding="same"), "stride 1"),
        (lambda: Conv2d(3, 4, 2, padding="same"), "asymmetric"),
        (lambda: MaxPool2d(2, ceil_mode=True), "ceil_mode"),
        (lambda: MaxPool2d(2, return_indices=True), "return_indices"),
        (lambda: AvgPool2d(2, divisor_override=3), "divisor_override"),
    ],
)
def test_unsupported_options_are_refused_clearly(build, message):
    with pytest.raises(ValueError, match=message):
        build()
