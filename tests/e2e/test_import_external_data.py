"""`convserve import` of graphs with external data: torch.onnx.export's default layout (``model.onnx`` +
``model.onnx.data``) and one file per tensor (the layout of graphs over 2 GB) become entries that serve
from any working directory; a graph naming data outside its folder is refused and nothing is written.

References: ONNX Runtime on the original export, opened here without convserve.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from convserve.testing import start_server_process
from convserve.testing.prerequisites import unavailable

if importlib.util.find_spec("torch") is None:
    unavailable("torch is not installed (pip install -e '.[dev]')", module_level=True)

import torch
from torch import nn


def _export(path: Path) -> Path:
    """torch.onnx.export with its defaults (dynamo) straight to a file: weights go to model.onnx.data."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 6),
    ).eval()  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        net, (torch.zeros(2, 1, 12, 12),), str(path), input_names=["input"], output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
    )  # fmt: skip
    return path


def _import(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "convserve.cli", "import", *args], capture_output=True, text=True,
        timeout=180, cwd=cwd,
    )  # fmt: skip


def test_torch_default_export_and_split_layout_import_and_serve_from_anywhere(
    tmp_path: Path, run_reference: Any
) -> None:
    import onnx

    exported = _export(tmp_path / "export" / "model.onnx")
    data = exported.parent / "model.onnx.data"
    assert data.stat().st_size > 0, "torch wrote no external data: the test would not test it"
    split = tmp_path / "split" / "model.onnx"
    split.parent.mkdir()
    # One file per weight over 1 KB (ONNX Runtime's shape inference needs the small constants inline).
    onnx.save_model(onnx.load(str(exported)), str(split), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=1024)  # fmt: skip
    assert len(list(split.parent.iterdir())) >= 3  # the graph and at least two data files
    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name, source in (("torch_default", exported), ("split", split)):
        done = _import(elsewhere, str(source), "--name", name, "--repository", str(repo))
        assert done.returncode == 0, done.stderr
        copied = sorted(p.name for p in (repo / name / "1").iterdir())
        assert copied == sorted(p.name for p in source.parent.iterdir()), copied
    server = start_server_process(["--model-repository", str(repo)], tmp_path / "server", cwd=elsewhere)
    try:
        from convserve.client import Client

        x = np.random.default_rng(3).normal(size=(3, 1, 12, 12)).astype(np.float32)
        logits = run_reference(exported, x)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        with Client(server.address) as client:
            for name in ("torch_default", "split"):
                results = client.classify_batch(x, model=name, top_k=6)
                for row, result in zip(probs, results, strict=True):
                    best = np.argsort(-row)
                    assert [p.index for p in result.predictions] == list(best)
                    np.testing.assert_allclose([p.probability for p in result.predictions], row[best],
                                               atol=1e-5)  # fmt: skip
    finally:
        assert server.stop() == 0


def test_a_graph_naming_data_outside_its_folder_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    import onnx

    exported = _export(tmp_path / "export" / "model.onnx")
    model = onnx.load(str(exported), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../export/model.onnx.data"
    hostile = tmp_path / "hostile" / "model.onnx"
    hostile.parent.mkdir()
    hostile.write_bytes(model.SerializeToString())
    repo = tmp_path / "repo"
    repo.mkdir()
    done = _import(tmp_path, str(hostile), "--name", "hostile", "--repository", str(repo))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error:") and "'../export/model.onnx.data'" in line and "'..'" in line, line
    assert list(repo.iterdir()) == []
