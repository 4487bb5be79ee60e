"""export_model: a verified, atomically written model repository entry — or an ExportError and no files."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from convserve.common.model_config import InputSpec, ModelConfig, load_config
from convserve.models import build
from convserve.models.export import ExportError, export_model, export_onnx_bytes, next_version, verify_onnx

LABELS = tuple(str(i) for i in range(10))


@pytest.fixture(scope="module")
def lenet() -> nn.Module:
    torch.manual_seed(0)
    return build("lenet")


@pytest.fixture
def cfg() -> ModelConfig:
    return ModelConfig(name="digits_lenet", labels=LABELS, architecture="lenet")


def _tree(root) -> list[str]:
    """Every path under root (hidden temporaries included), relative, sorted."""
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, dirs, files in os.walk(root)
                  for f in [*dirs, *files])


def test_export_writes_a_verified_entry(lenet, cfg, tmp_path):
    repo = tmp_path / "repo"
    path = export_model(lenet, cfg, repo)
    assert path == repo / "digits_lenet" / "1" / "model.onnx"
    assert _tree(repo) == ["digits_lenet", "digits_lenet/1", "digits_lenet/1/model.onnx",
                           "digits_lenet/config.json"]
    assert load_config(repo / "digits_lenet") == cfg

    proto = onnx.load(path)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert {n.op_type for n in proto.graph.node} >= {"Conv", "MaxPool", "Gemm"}
    assert proto.opset_import[0].version >= 18
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("input", "logits")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [1, 28, 28]
    for batch in (1, 5):  # the batch dimension is dynamic
        x = torch.randn(batch, 1, 28, 28)
        (got,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(got, lenet.eval()(x).numpy(), atol=1e-4, rtol=0)


# File handling does not depend on the exporter: the tests below use the fast legacy one where they can.
FAST = "torchscript"


def test_versions_increment_and_existing_versions_need_force(lenet, cfg, tmp_path):
    repo = tmp_path / "repo"
    export_model(lenet, cfg, repo, method=FAST)
    assert export_model(lenet, cfg, repo, method=FAST).parent.name == "2"
    assert next_version(repo / "digits_lenet") == 3
    before = (repo / "digits_lenet" / "1" / "model.onnx").read_bytes()
    with pytest.raises(ExportError, match="already exists"):
        export_model(build("lenet"), cfg, repo, version=1)
    assert (repo / "digits_lenet" / "1" / "model.onnx").read_bytes() == before

    other = build("lenet")
    path = export_model(other, cfg.replace(max_batch_size=8), repo, version=1, force=True, method=FAST)
    assert path.read_bytes() != before
    assert load_config(repo / "digits_lenet").max_batch_size == 8
    assert not [p for p in _tree(repo) if os.path.basename(p).startswith(".")]  # no temporaries left


def test_unwritable_repository_is_a_clear_error(lenet, cfg, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the repository should be")
    with pytest.raises(ExportError, match="cannot create model repository"):
        export_model(lenet, cfg, blocker / "repo")
    with pytest.raises(ExportError, match="not a directory"):
        export_model(lenet, cfg, blocker)


def test_a_config_that_contradicts_the_model_writes_nothing(lenet, cfg, tmp_path):
    with pytest.raises(ExportError, match="10 classes but the config lists 3 labels"):
        export_model(lenet, cfg.replace(labels=("a", "b", "c")), tmp_path, method=FAST)
    rgb = cfg.replace(input=InputSpec(shape=(3, 28, 28)))
    with pytest.raises(ExportError, match=r"input\.shape"):
        export_model(lenet, rgb, tmp_path, method=FAST)
    assert _tree(tmp_path) == []


class _DiffersWhenExported(nn.Module):
    """Computes something else while being exported: the exported graph cannot match eager PyTorch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = build("lenet")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        return logits * 2 if torch.compiler.is_exporting() else logits


def test_an_export_that_disagrees_with_pytorch_is_refused(cfg, tmp_path):
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_model(_DiffersWhenExported(), cfg, tmp_path)
    assert _tree(tmp_path) == []


def test_export_keeps_the_callers_training_mode(cfg, tmp_path):
    model = build("lenet").train()
    export_model(model, cfg, tmp_path, method=FAST)
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("classic", [False, True])  # max pooling + BatchNorm, or tanh + average pooling
def test_legacy_torchscript_exporter_gives_the_same_standard_graph(classic):
    model = build("lenet", classic=classic)
    onnx_bytes = export_onnx_bytes(model, (1, 28, 28), method="torchscript")
    check = verify_onnx(model, onnx_bytes, (1, 28, 28), batch=3)
    assert check.max_abs_diff <= 1e-4
    ops = {n.op_type for n in onnx.load_from_string(onnx_bytes).graph.node}
    assert {"Conv", "AveragePool" if classic else "MaxPool"} <= ops
    with pytest.raises(ExportError, match="unknown export method"):
        export_onnx_bytes(model, (1, 28, 28), method="jit")


def test_batchnorm_folding_leaves_the_model_alone_and_matches_unfolded_export():
    torch.manual_seed(1)
    model = build("resnet20", input_size=16, width=0.25)
    model(torch.randn(8, 3, 16, 16))  # a training-mode pass gives BatchNorm non-trivial running statistics
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folded = export_onnx_bytes(model, (3, 16, 16), method="torchscript")
    plain = export_onnx_bytes(model, (3, 16, 16), method="torchscript", fold_batchnorm=False)
    assert verify_onnx(model, folded, (3, 16, 16)).max_abs_diff <= 1e-4
    assert verify_onnx(model, plain, (3, 16, 16)).max_abs_diff <= 1e-4
    assert "BatchNormalization" not in {n.op_type for n in onnx.load_from_string(folded).graph.node}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
