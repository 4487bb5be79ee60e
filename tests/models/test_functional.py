"""conv2d / max_pool2d / avg_pool2d: values and gradients against torch.nn.functional and the seed's loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convserve.models import functional as cf

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LOOPS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def conv_cases(draw):
    groups = draw(st.integers(1, 3))
    c, o = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    # The input is at least as large as the dilated kernel, so every case has an output.
    h = draw(st.integers(dilation[0] * (kernel[0] - 1) + 1, 9))
    w = draw(st.integers(dilation[1] * (kernel[1] - 1) + 1, 9))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((draw(st.integers(1, 2)), c, h, w), generator=g, dtype=torch.float64)
    weight = torch.randn((o, c // groups, *kernel), generator=g, dtype=torch.float64)
    bias = torch.randn(o, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    return x, weight, bias, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


@st.composite
def pool_cases(draw):
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
    h, w = draw(st.integers(kernel[0], 9)), draw(st.integers(kernel[1], 9))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), h, w)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, dict(kernel_size=kernel, stride=stride, padding=padding)


def _grads(fn, inputs, upstream):
    """Gradients of <fn(*inputs), upstream> with respect to every tensor input."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*leaves)
    torch.autograd.backward(out, upstream)
    return out.detach(), [t.grad for t in leaves if t is not None]


@FAST
@given(conv_cases())
def test_conv2d_matches_torch_values_and_gradients(case):
    x, weight, bias, kw = case
    expected = F.conv2d(x, weight, bias, **kw)
    upstream = torch.randn_like(expected)
    out, grads = _grads(lambda a, b, c: cf.conv2d(a, b, c, **kw), (x, weight, bias), upstream)
    ref_out, ref_grads = _grads(lambda a, b, c: F.conv2d(a, b, c, **kw), (x, weight, bias), upstream)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@LOOPS
@given(conv_cases())
def test_conv2d_matches_seed_loop(conv_loop, case):
    x, weight, bias, kw = case
    torch.testing.assert_close(cf.conv2d(x, weight, bias, **kw), conv_loop(x, weight, bias, **kw),
                               rtol=1e-10, atol=1e-10)


@FAST
@given(pool_cases())
def test_max_pool2d_matches_torch_values_and_gradients(case):
    x, kw = case
    expected = F.max_pool2d(x, **kw)
    upstream = torch.randn_like(expected)
    out, (grad,) = _grads(lambda a: cf.max_pool2d(a, **kw), (x,), upstream)
    ref_out, (ref_grad,) = _grads(lambda a: F.max_pool2d(a, **kw), (x,), upstream)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


@FAST
@given(pool_cases(), st.booleans())
def test_avg_pool2d_matches_torch_values_and_gradients(case, count_include_pad):
    x, kw = case
    expected = F.avg_pool2d(x, count_include_pad=count_include_pad, **kw)
    upstream = torch.randn_like(expected)
    out, (grad,) = _grads(lambda a: cf.avg_pool2d(a, count_include_pad=count_include_pad, **kw), (x,),
                          upstream)
    ref_out, (ref_grad,) = _grads(lambda a: F.avg_pool2d(a, count_include_pad=count_include_pad, **kw),
                                  (x,), upstream)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-10)


@LOOPS
@given(pool_cases(), st.sampled_from(["max", "avg", "avg-no-pad"]))
def test_pooling_matches_seed_loop(pool_loop, case, mode):
    x, kw = case
    loop_kw = dict(kernel=kw["kernel_size"], stride=kw["stride"], padding=kw["padding"])
    if mode == "max":
        got, want = cf.max_pool2d(x, **kw), pool_loop(x, mode="max", **loop_kw)
    else:
        include = mode == "avg"
        got = cf.avg_pool2d(x, count_include_pad=include, **kw)
        want = pool_loop(x, mode="avg", count_include_pad=include, **loop_kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_seed_example_cross_correlation():
    """The textbook's worked example: X = 0..8 as 3×3, K = [[0, 1], [2, 3]] gives [[19, 25], [37, 43]]."""
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    k = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    assert cf.conv2d(x, k).flatten().tolist() == [19.0, 25.0, 37.0, 43.0]
    assert cf.max_pool2d(x, 2, stride=1).flatten().tolist() == [4.0, 5.0, 7.0, 8.0]
    assert cf.avg_pool2d(x, 2, stride=1).flatten().tolist() == [2.0, 3.0, 5.0, 6.0]


def test_float32_within_1e_5_of_torch_on_a_realistic_layer():
    g = torch.Generator().manual_seed(1)
    x = torch.randn((4, 16, 20, 20), generator=g)
    w = torch.randn((32, 16, 3, 3), generator=g) * 0.1
    b = torch.randn(32, generator=g)
    torch.testing.assert_close(cf.conv2d(x, w, b, stride=2, padding=1),
                               F.conv2d(x, w, b, stride=2, padding=1), rtol=1e-5, atol=1e-5)
    dw = torch.randn((16, 1, 3, 3), generator=g)  # depthwise: one filter per channel
    torch.testing.assert_close(cf.conv2d(x, dw, padding=1, groups=16), F.conv2d(x, dw, padding=1, groups=16),
                               rtol=1e-5, atol=1e-5)


def test_gradcheck_against_finite_differences():
    g = torch.Generator().manual_seed(2)
    # fast_mode checks a random projection of the Jacobian against finite differences: seconds → ms.
    x = torch.randn((1, 2, 5, 4), generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn((4, 1, 3, 2), generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: cf.conv2d(x, w, b, stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
        (x, w, b), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: cf.max_pool2d(x, 3, 2, 1), (x,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: cf.avg_pool2d(x, 3, 2, 1, count_include_pad=False), (x,),
                                    fast_mode=True)


@pytest.mark.parametrize("shift", [(1, 0), (0, 2), (3, 1)])
def test_convolution_is_translation_equivariant(shift):
    """The seed's prior: shift the input and the output shifts by the same amount (away from borders)."""
    dy, dx = shift
    g = torch.Generator().manual_seed(3)
    x = torch.randn((1, 2, 16, 16), generator=g, dtype=torch.float64)
    w = torch.randn((3, 2, 3, 3), generator=g, dtype=torch.float64)
    out = cf.conv2d(x, w)
    shifted = cf.conv2d(torch.roll(x, shifts=(dy, dx), dims=(2, 3)), w)
    oh, ow = out.shape[-2:]
    torch.testing.assert_close(shifted[..., dy:, dx:], out[..., : oh - dy, : ow - dx])


def test_pooling_is_equivariant_to_shifts_by_its_stride():
    g = torch.Generator().manual_seed(4)
    x = torch.randn((1, 2, 16, 16), generator=g, dtype=torch.float64)
    out = cf.max_pool2d(x, 2)
    shifted = cf.max_pool2d(torch.roll(x, shifts=(2, 4), dims=(2, 3)), 2)  # one and two output pixels
    torch.testing.assert_close(shifted[..., 1:, 2:], out[..., :-1, :-2])


def test_custom_ops_are_registered_with_fake_kernels():
    """Export traces through the fake kernels: shapes must propagate on the meta device."""
    x = torch.empty((5, 4, 17, 13), device="meta")
    w = torch.empty((8, 2, 3, 3), device="meta")
    assert torch.ops.convserve.conv2d(x, w, None, [2, 1], [1, 1], [1, 1], 2).shape == (5, 8, 9, 13)
    assert torch.ops.convserve.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1]).shape == (5, 4, 9, 7)
    assert torch.ops.convserve.avg_pool2d(x, [2, 2], [2, 2], [0, 0], True).shape == (5, 4, 8, 6)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cf.conv2d(torch.zeros(1, 3, 8, 8), torch.zeros(4, 2, 3, 3), groups=2), "groups"),
        (lambda: cf.conv2d(torch.zeros(3, 8, 8), torch.zeros(4, 3, 3, 3)), "4-D"),
        (lambda: cf.conv2d(torch.zeros(1, 3, 2, 2), torch.zeros(4, 3, 3, 3)), "does not fit"),
        (lambda: cf.conv2d(torch.zeros(1, 3, 8, 8), torch.zeros(4, 3, 3, 3), stride=0), "stride"),
        (lambda: cf.max_pool2d(torch.zeros(1, 1, 8, 8), 2, padding=2), "half the kernel"),
        (lambda: cf.avg_pool2d(torch.zeros(1, 1, 2, 2), 3), "does not fit"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
