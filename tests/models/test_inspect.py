"""`convserve inspect`: the kernels and feature maps drawn are the served graph's, checked with torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from convserve.cli import main
from convserve.common.model_config import load_config
from convserve.models import data, inspection
from convserve.server.runtime.preprocess import decode_image

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "model_repository" / "digits_lenet"


@pytest.fixture()
def digit_png(tmp_path: Path) -> Path:
    """A '7' of scikit-learn's digits, dark on white and enlarged, as a user might photograph it."""
    digits = data.load_digits()
    i = int(np.flatnonzero(digits.labels == 7)[0])
    img = Image.fromarray(255 - np.asarray(digits.load(i))).resize((80, 80), Image.Resampling.BICUBIC)
    path = tmp_path / "digit.png"
    img.save(path)
    return path


def test_first_layer_and_its_feature_maps_match_torch(digit_png: Path) -> None:
    result = inspection.inspect_model(SHIPPED, digit_png)
    graph = onnx.load(str(SHIPPED / "1" / "model.onnx")).graph
    conv = next(n for n in graph.node if n.op_type == "Conv")
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    kernel, bias = weights[conv.input[1]], weights[conv.input[2]]
    np.testing.assert_array_equal(result.kernels, kernel)
    pads = next(a.ints for a in conv.attribute if a.name == "pads")

    cfg = load_config(SHIPPED)
    x = decode_image(digit_png.read_bytes(), cfg)[None]
    np.testing.assert_array_equal(result.image, x[0])  # the server's preprocessing, not a private copy
    reference = F.relu(F.conv2d(torch.tensor(x), torch.tensor(kernel), torch.tensor(bias),
                                padding=(pads[0], pads[1]))).numpy()[0]
    title, maps = result.layers[0]
    assert title.startswith("conv1")
    np.testing.assert_allclose(maps, reference, rtol=1e-4, atol=1e-5)
    pool_title, pooled = result.layers[1]
    assert pool_title.startswith("pool1")
    np.testing.assert_allclose(pooled, F.max_pool2d(torch.from_numpy(reference)[None], 2).numpy()[0],
                               rtol=1e-4, atol=1e-5)
    # the probabilities are the served model's own
    session = ort.InferenceSession(str(SHIPPED / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {cfg.input.name: x})[0][0].astype(np.float64)
    np.testing.assert_allclose(result.probabilities, np.exp(logits) / np.exp(logits).sum(), rtol=1e-6)
    shapes = [m.shape for _, m in result.layers]
    assert [s[0] for s in shapes] == [kernel.shape[0], kernel.shape[0], 16, 16]
    assert shapes[-1][1:] == (5, 5)


def test_cli_writes_the_png_and_bad_input_is_one_line(digit_png: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "inspect.png"
    assert main(["inspect", "--model-dir", str(SHIPPED), "--image", str(digit_png), "--out", str(out)]) == 0
    assert "first-layer kernels of 5x5" in capsys.readouterr().out
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 20_000
    with Image.open(out) as png:
        assert png.size[0] > 600 and png.size[1] > 400

    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    for argv, expected in (
        (["--image", str(tmp_path / "missing.png")], "no such file"),
        (["--image", str(tmp_path / "junk.png")], "do not decode"),
    ):
        rc = main(["inspect", "--model-dir", str(SHIPPED), "--out", str(tmp_path / "x.png"), *argv])
        err = capsys.readouterr().err.strip()
        assert rc == 1 and err.startswith("error: ") and expected in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()
