"""`convserve import`: a torchvision-style ResNet exported elsewhere with torch.onnx (random weights)
becomes a repository entry that classifies PNGs on a real server, with the labels and normalisation given.

The reference is computed here without convserve: numpy normalisation of the same pixels, then ONNX
Runtime on the original file, then softmax.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from convserve.testing.prerequisites import unavailable

if importlib.util.find_spec("torch") is None:
    unavailable("torch is not installed (pip install -e '.[dev]')", module_level=True)

import torch
from torch import nn

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
LABELS = [f"species_{i}" for i in range(10)]


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: two 3x3 conv-bn, a projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: Any) -> Any:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.downsample(x))


def tiny_resnet(classes: int = 10) -> nn.Module:
    """A torchvision-layout ResNet (stem, four stages, avgpool, fc) at a width that exports in seconds."""
    torch.manual_seed(0)
    widths = (8, 16, 32, 64)
    layers: list[nn.Module] = [
        nn.Conv2d(3, widths[0], 7, 2, 3, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = widths[0]
    for i, w in enumerate(widths):
        layers.append(BasicBlock(cin, w, 1 if i == 0 else 2))
        cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    model = nn.Sequential(*layers)
    for m in model.modules():  # non-trivial batch-norm statistics, as trained weights would have
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _export(path: Path) -> Path:
    example = torch.zeros(2, 3, 32, 32)
    program = torch.onnx.export(
        tiny_resnet(),
        (example,),
        dynamo=True,
        input_names=["data"],
        output_names=["scores"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
    )
    program.save(str(path))
    return path


def _convserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "convserve.cli", *args], capture_output=True, text=True, timeout=180
    )


def test_imported_resnet_classifies_pngs(
    tmp_path: Path, server_process: Any, run_reference: Any, encode_png: Any
) -> None:
    onnx_path = _export(tmp_path / "resnet.onnx")
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    repo = tmp_path / "repo"
    done = _convserve(
        "import",
        str(onnx_path),
        "--name",
        "resnet_tv",
        "--labels",
        str(tmp_path / "labels.txt"),
        "--preprocess",
        "imagenet",
        "--repository",
        str(repo),
    )
    assert done.returncode == 0, done.stderr
    assert (repo / "resnet_tv" / "1" / "model.onnx").read_bytes() == onnx_path.read_bytes()
    assert sorted(p.name for p in repo.iterdir()) == ["resnet_tv"]  # no staging folder left behind

    server = server_process("--model-repository", str(repo))
    from convserve.client import Client

    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    x = ((images.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2)
    logits = run_reference(onnx_path, np.ascontiguousarray(x))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    with Client(server.address) as client:
        results = client.classify_batch([encode_png(img) for img in images], model="resnet_tv", top_k=3)
    for row, result in zip(probs, results, strict=True):
        best = np.argsort(-row)[:3]
        assert [p.label for p in result.predictions] == [LABELS[i] for i in best]
        np.testing.assert_allclose([p.probability for p in result.predictions], row[best], atol=1e-4)
    assert server.stop() == 0


def test_import_misuse_is_one_line_and_writes_nothing(tmp_path: Path, make_model: Any) -> None:
    onnx_path = make_model(tmp_path / "m.onnx", channels=3, size=8, classes=4)
    repo = tmp_path / "repo"
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    cases = [
        (["--labels", str(tmp_path / "three.txt")], "--labels: the graph has 4 classes but the file lists 3"),
        (["--name", "bad/name"], "--name: expected a model name"),
        (["--mean", "0.5,0.5"], "preprocessing.mean/std need one value per channel (3)"),
    ]
    for extra, message in cases:
        args = ["import", str(onnx_path), "--repository", str(repo)]
        args += extra if "--name" in extra else ["--name", "m", *extra]
        done = _convserve(*args)
        assert done.returncode == 1 and done.stderr.strip().startswith("error: "), done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr
        assert not repo.exists() or not any(repo.iterdir())
    assert _convserve("import", str(onnx_path), "--name", "m", "--repository", str(repo)).returncode == 0
    again = _convserve("import", str(onnx_path), "--name", "m", "--repository", str(repo), "--version", "1")
    assert again.returncode == 1 and "already exists; pass --force" in again.stderr
    assert _convserve("import", str(onnx_path), "--name", "m", "--repository", str(repo)).returncode == 0
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "2", "config.json"]


def test_an_imported_resnet_quantizes_on_the_users_images(tmp_path: Path, run_reference: Any,
                                                          encode_png: Any) -> None:
    """Imported: no training data, so `quantize` calibrates on --calibration; --force because random weights
    make the accuracy gate meaningless. The int8 version lands beside the import and runs every Conv/Gemm
    in int8, its top-1 answers close to the float graph's on the same PNGs."""
    import onnx

    from convserve.cli import main
    from convserve.common.model_config import load_config
    from convserve.server.runtime.preprocess import decode_image

    onnx_path = _export(tmp_path / "resnet.onnx")
    repo = tmp_path / "repo"
    assert _convserve("import", str(onnx_path), "--name", "resnet_tv", "--preprocess", "imagenet",
                      "--repository", str(repo)).returncode == 0
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    rng = np.random.default_rng(3)
    for i in range(24):
        (pngs / f"{i}.png").write_bytes(encode_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    assert main(["quantize", str(repo / "resnet_tv"), "--calibration", str(pngs), "--force"]) == 0

    int8_path = repo / "resnet_tv" / "2" / "model.onnx"
    graph = onnx.load(str(int8_path)).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    cfg = load_config(repo / "resnet_tv")
    assert cfg.quantized[0].float_nodes == () and cfg.quantized[0].from_version == 1
    x = np.stack([decode_image(p.read_bytes(), cfg) for p in sorted(pngs.glob("*.png"))])
    float_logits, int8_logits = run_reference(onnx_path, x), run_reference(int8_path, x)
    # Random weights give near-ties, so compare the logits, not only the argmax: int8 error is small.
    scale = np.abs(float_logits).max()
    assert np.abs(int8_logits - float_logits).max() < 0.1 * scale
