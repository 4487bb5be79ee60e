"""Every registered architecture: canonical shapes, one training step, ONNX export matching ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from convserve.models import build, list_architectures
from convserve.models.export import STANDARD_DOMAINS, export_onnx_bytes, verify_onnx
from convserve.models.layers import Conv2d, Pool2d
from convserve.models.registry import UnknownArchitectureError, get_architecture
from convserve.models.summary import count_macs, count_parameters, format_table, mlp_parameters, summarize

# Published parameter counts (torchvision for AlexNet/VGG/ResNet-18; the MobileNet v1 paper's 4.2M,
# Keras' 4,231,976 trainable) at 224×224×3 with 1000 classes.
PUBLISHED_PARAMS = {
    "alexnet": 61_100_840,
    "vgg11": 132_863_336,
    "vgg16": 138_357_544,
    "resnet18": 11_689_512,
    "mobilenet": 4_231_976,
}


def _meta_build(name: str, **kwargs) -> torch.nn.Module:
    """Build on the meta device: shapes and counts without allocating VGG's half a gigabyte."""
    with torch.device("meta"):
        return build(name, **kwargs)


def test_every_family_the_seed_names_is_registered():
    names = set(list_architectures())
    assert {"lenet", "alexnet", "vgg11", "vgg16", "inception", "resnet18", "resnet20", "mobilenet"} <= names


@pytest.mark.parametrize(("name", "params"), sorted(PUBLISHED_PARAMS.items()))
def test_canonical_parameter_counts_match_the_published_networks(name, params):
    model = _meta_build(name)
    assert count_parameters(model) == params
    assert model(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 1000)


def test_resnet18_has_the_real_shape():
    model = _meta_build("resnet18")
    convs = [m for m in model.modules() if isinstance(m, Conv2d)]
    assert len(convs) == 1 + 16 + 3  # stem, two per basic block, three downsampling shortcuts
    assert count_macs(model, (3, 224, 224)) == pytest.approx(1.82e9, rel=0.01)  # the well-known 1.8 GMACs


def test_only_our_conv_and_pool_layers_are_used():
    for name in list_architectures():
        model = _meta_build(name)
        kinds = {type(m) for m in model.modules()}
        torch_layers = {torch.nn.Conv2d, torch.nn.MaxPool2d, torch.nn.AvgPool2d, torch.nn.AdaptiveAvgPool2d}
        assert not kinds & torch_layers
        convolutional = get_architecture(name).convolutional
        assert any(isinstance(m, Conv2d) for m in model.modules()) == convolutional
        assert any(isinstance(m, Pool2d) for m in model.modules()) == convolutional


def test_the_dense_baseline_matches_lenets_budget():
    """`convserve robustness` compares LeNet with an MLP of about the same parameter count."""
    lenet, mlp = build("lenet"), build("mlp")
    assert not get_architecture("mlp").convolutional and get_architecture("lenet").convolutional
    assert abs(count_parameters(mlp) - count_parameters(lenet)) < 0.05 * count_parameters(lenet)
    assert [m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)] == [72, 48, 10]


def test_build_options_and_errors():
    arch = get_architecture("lenet")
    assert (arch.in_channels, arch.num_classes, arch.input_size) == (1, 10, (28, 28))
    small, wide = _meta_build("resnet20", width=0.5), _meta_build("resnet20", width=2.0)
    assert count_parameters(small) < count_parameters(_meta_build("resnet20")) < count_parameters(wide)
    assert _meta_build("vgg11", in_channels=1, num_classes=5, input_size=64)(
        torch.empty(1, 1, 64, 64, device="meta")).shape == (1, 5)
    with pytest.raises(UnknownArchitectureError, match="choose one of"):
        build("resnet1000")
    with pytest.raises(ValueError, match="at least"):
        build("resnet18", input_size=16)


@pytest.mark.parametrize("name", list_architectures())
def test_architecture_trains_a_step_and_exports_to_matching_onnx(name):
    arch = get_architecture(name)
    size = arch.min_input_size
    torch.manual_seed(0)
    model = build(name, input_size=size, num_classes=7, width=0.25 if name != "lenet" else 1.0)
    x = torch.randn(4, arch.in_channels, size, size)
    y = torch.tensor([0, 1, 2, 3])
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))

    shape = (arch.in_channels, size, size)
    onnx_bytes = export_onnx_bytes(model, shape)
    assert model.training, "export must not flip the caller's module to eval mode"
    check = verify_onnx(model, onnx_bytes, shape, batch=3, tolerance=1e-4)  # raises beyond 1e-4 (allclose)
    assert check.max_abs_diff <= 1e-4 * max(1.0, check.max_abs_output)
    graph = onnx.load_from_string(onnx_bytes).graph
    assert {n.domain for n in graph.node} <= STANDARD_DOMAINS
    assert ("Conv" in {n.op_type for n in graph.node}) == arch.convolutional
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch dimension is symbolic

    # `convserve quantize` makes every compute node int8 and the graph still runs (random calibration:
    # the weights are random too, so this checks the graph, not accuracy; tests/models/test_quantize.py does).
    from convserve.models.quantize import float_compute_nodes, quantize_graph

    calib = np.random.default_rng(0).normal(size=(8, *shape)).astype(np.float32)
    int8_bytes = quantize_graph(onnx_bytes, "input", calib)
    assert float_compute_nodes(int8_bytes) == ()
    session = ort.InferenceSession(int8_bytes, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input": calib[:3]})
    assert out.shape == (3, 7) and np.isfinite(out).all()


def test_summary_makes_the_seeds_point():
    rows = {r["name"]: r for r in summarize()}
    assert rows["mlp-10k"]["params"] == mlp_parameters() == pytest.approx(1e9, rel=0.1)
    for name in list_architectures():
        assert rows[name]["params"] < 0.2 * rows["mlp-10k"]["params"]
        assert rows[name]["flops"] == 2 * rows[name]["macs"] > 0
    assert rows["resnet18"]["params"] == 11_689_512
    table = format_table(list(rows.values()))
    assert all(name in table for name in rows)
