"""`convserve quantize`: the accuracy gate refuses a degraded int8 graph and writes nothing; --force writes
the next version atomically; both versions then serve side by side; an imported model needs --calibration.

The references are independent: fresh ONNX Runtime sessions on the float and the written int8 file, fed
PNG files decoded by the server's own preprocessing.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from convserve.cli import main
from convserve.common.model_config import VersionPolicy, load_config, write_config
from convserve.models import data, evaluate, robustness
from convserve.server.runtime.preprocess import decode_image

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "model_repository" / "digits_lenet"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The digits' held-out split as labelled PNGs, 64 training images as calibration, and a degraded
    calibration set: blank images, whose activation ranges say nothing about real digits."""
    root = tmp_path_factory.mktemp("quantize_images")
    digits = data.load_dataset("digits")
    train, test = digits.train_test()
    for i in test:
        target = root / "eval" / digits.class_names[digits.labels[i]] / f"{i}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        digits.load(int(i)).save(target)
    (root / "calibration").mkdir()
    for i in train[::len(train) // 64][:64]:
        digits.load(int(i)).save(root / "calibration" / f"{i}.png")
    (root / "blank").mkdir()
    for i in range(4):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "blank" / f"{i}.png")
    return {name: root / name for name in ("eval", "calibration", "blank")}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repository = tmp_path / "repo"
    shutil.copytree(SHIPPED, repository / "digits_lenet")
    return repository


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in root.rglob("*")}


def _one_error_line(err: str, *expected: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], err


def _references(model_dir: Path, eval_dir: Path, version: int) -> tuple[np.ndarray, np.ndarray]:
    """(predicted output index, true output index) for every eval PNG, by a fresh ORT session."""
    import onnxruntime as ort

    cfg = load_config(model_dir)
    files = sorted(eval_dir.glob("*/*.png"))
    x = np.stack([decode_image(f.read_bytes(), cfg) for f in files])
    session = ort.InferenceSession(str(model_dir / str(version) / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {cfg.input.name: x})
    return logits.argmax(1), np.array([cfg.labels.index(f.parent.name) for f in files])


def test_a_degraded_calibration_is_refused_and_nothing_is_written(
        repo: Path, images: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(repo)
    rc = main(["quantize", str(repo / "digits_lenet"), "--calibration", str(images["blank"]),
               "--eval", str(images["eval"])])
    captured = capsys.readouterr()
    assert rc == 3
    _one_error_line(captured.err, "int8 version not written", "top-1 agreement", "--force")
    assert "top-1 accuracy" in captured.out and "gate: FAILED" in captured.out  # the table is printed
    assert _snapshot(repo) == before  # no version, no config change, no staging folder


def test_force_writes_the_next_version_atomically_and_both_serve_side_by_side(
        repo: Path, images: dict[str, Path], capsys: pytest.CaptureFixture[str], server_factory: Any) -> None:
    model_dir = repo / "digits_lenet"
    float_bytes = (model_dir / "1" / "model.onnx").read_bytes()
    seen: list[tuple[bool, int]] = []  # (version 2 listed, its model.onnx size) as a poller saw them
    done = threading.Event()

    def poll() -> None:
        deadline = time.monotonic() + 120
        for _ in range(200_000):
            if done.is_set() or time.monotonic() > deadline:
                return
            listed = (model_dir / "2").is_dir()
            path = model_dir / "2" / "model.onnx"
            seen.append((listed, path.stat().st_size if listed else 0))
            json.loads((model_dir / "config.json").read_text())  # never half-written

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        rc = main(["quantize", str(model_dir), "--calibration", str(images["calibration"]),
                   "--eval", str(images["eval"]), "--force"])
    finally:
        done.set()
        poller.join(30)
    out = capsys.readouterr().out
    assert rc == 0, out
    written = (model_dir / "2" / "model.onnx").read_bytes()
    assert seen, "the poller never looked"
    assert all(size == len(written) for listed, size in seen if listed)  # version 2 appeared whole
    assert (model_dir / "1" / "model.onnx").read_bytes() == float_bytes
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2", "config.json"]

    import onnx

    ops = {n.op_type for n in onnx.load_from_string(written).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    cfg = load_config(model_dir)
    assert cfg.replace(quantized=()) == load_config(SHIPPED)  # config unchanged but for the record
    (record,) = cfg.quantized
    assert (record.version, record.from_version) == (2, 1)
    assert "per-channel" in record.method and str(images["calibration"]) in record.calibration

    # Independently: the int8 file answers as the float one on the held-out PNGs.
    float_pred, truth = _references(model_dir, images["eval"], 1)
    int8_pred, _ = _references(model_dir, images["eval"], 2)
    assert np.mean(int8_pred == float_pred) >= 0.99
    assert np.mean(float_pred == truth) - np.mean(int8_pred == truth) <= 0.005
    result = evaluate.evaluate_model_dir(model_dir, f"imagefolder:{images['eval']}", version=2, split="all")
    assert result.version == 2 and result.accuracy == pytest.approx(np.mean(int8_pred == truth))
    curves = robustness.measure([model_dir, model_dir], "digits", versions=[1, 2])
    assert [m.name for m in curves.models] == ["digits_lenet v1", "digits_lenet v2"]

    # Served side by side under an "all" policy, each version with its own metrics.
    write_config(model_dir, cfg.replace(version_policy=VersionPolicy(all=True)))
    server = server_factory(model_repository=repo)
    from convserve.client import Client

    files = sorted(images["eval"].glob("*/*.png"))[:8]
    with Client(server.address) as client:
        for version, expected in ((1, float_pred[:8]), (2, int8_pred[:8])):
            got = [client.classify(f.read_bytes(), model="digits_lenet", version=version) for f in files]
            assert [g.label for g in got] == [cfg.labels[k] for k in expected]
    for version in ("1", "2"):
        labels = {"api": "classify", "code": "OK", "model": "digits_lenet", "version": version}
        assert server.registry.get_sample_value("convserve_requests_total", labels) == len(files)


def test_an_imported_model_needs_calibration(tmp_path: Path, make_model: Any,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    onnx_path = make_model(tmp_path / "tiny.onnx", channels=1, size=8, classes=4)
    repository = tmp_path / "repo"
    assert main(["import", str(onnx_path), "--name", "tiny", "--repository", str(repository)]) == 0
    capsys.readouterr()
    before = _snapshot(repository)
    rc = main(["quantize", str(repository / "tiny")])
    _one_error_line(capsys.readouterr().err, "not trained by convserve", "--calibration IMAGES_DIR")
    assert rc == 1
    assert _snapshot(repository) == before


def test_misuse_is_one_error_line_and_writes_nothing(repo: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = str(repo / "digits_lenet")
    before = _snapshot(repo)
    cases = [
        (["--calibration", str(tmp_path / "missing")], "--calibration", "expected a folder of images"),
        (["--eval", str(tmp_path / "missing")], "--eval", "expected a folder of images"),
        (["--from-version", "0"], "--from-version must be a positive integer"),
        (["--from-version", "7"], "has no version 7; available: [1]"),
    ]
    for extra, *expected in cases:
        assert main(["quantize", model_dir, *extra]) == 1
        _one_error_line(capsys.readouterr().err, *expected)
    assert main(["quantize", str(repo / "nothing_here")]) == 1
    _one_error_line(capsys.readouterr().err, "no config.json")
    assert _snapshot(repo) == before
