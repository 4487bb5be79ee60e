"""Evaluation runs the exported artefact through ONNX Runtime; the shipped digits model meets its target."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from convserve.common.model_config import load_config
from convserve.models import data, evaluate
from convserve.testing.prerequisites import unavailable

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "model_repository" / "digits_lenet"
TARGET_ACCURACY = 0.985


@pytest.fixture(scope="module")
def digits() -> data.ImageDataset:
    return data.load_dataset("digits")


def test_shipped_model_reaches_the_target_on_the_held_out_digits() -> None:
    result = evaluate.evaluate_model_dir(SHIPPED, "digits")
    assert result.model == "digits_lenet" and result.version == 1 and result.split == "test"
    assert result.total == 359
    assert result.accuracy >= TARGET_ACCURACY, evaluate.format_report(result)
    assert set(result.per_class_accuracy) == set("0123456789")


def test_shipped_config_is_servable() -> None:
    cfg = load_config(SHIPPED)
    assert cfg.labels == tuple("0123456789")
    assert cfg.max_batch_size >= 64
    assert cfg.input.shape == (1, 28, 28) and cfg.preprocessing.color_mode == "L"


def test_accuracy_equals_a_direct_onnx_runtime_run_on_png_files(digits: data.ImageDataset,
                                                                 tmp_path: Path) -> None:
    """The evaluator's number, rebuilt independently: the test split written as PNG files (as a user would
    have them), decoded by the server's code path, run by a fresh ORT session, compared by label name."""
    from convserve.server.runtime.preprocess import decode_image

    _, test_idx = data.split_indices(digits.labels)
    folder = tmp_path / "digits_png"
    for i in test_idx:
        target = folder / digits.class_names[digits.labels[i]] / f"{i}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        digits.load(int(i)).save(target)

    cfg = load_config(SHIPPED)
    session = ort.InferenceSession(str(SHIPPED / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    files = sorted(folder.glob("*/*.png"))
    x = np.stack([decode_image(f.read_bytes(), cfg) for f in files])
    (logits,) = session.run(None, {cfg.input.name: x})
    predicted = [cfg.labels[k] for k in logits.argmax(1)]
    expected = float(np.mean([p == f.parent.name for p, f in zip(predicted, files, strict=True)]))

    on_folder = evaluate.evaluate_model_dir(SHIPPED, f"imagefolder:{folder}", split="all")
    on_digits = evaluate.evaluate_model_dir(SHIPPED, "digits", split="test")
    assert on_folder.total == on_digits.total == len(test_idx)
    assert on_folder.accuracy == pytest.approx(expected)
    assert on_digits.accuracy == pytest.approx(expected)


def test_labels_are_matched_by_name_not_folder_order(tmp_path: Path, digits: data.ImageDataset) -> None:
    # Only classes "3" and "7": folder indices 0 and 1 must map to model outputs 3 and 7.
    for label in ("3", "7"):
        for i in np.flatnonzero(digits.labels == int(label))[:5]:
            target = tmp_path / label / f"{i}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            digits.load(int(i)).save(target)
    result = evaluate.evaluate_model_dir(SHIPPED, f"imagefolder:{tmp_path}", split="all")
    assert result.total == 10
    assert set(result.per_class_accuracy) == {"3", "7"}
    assert result.accuracy >= 0.9  # training images of a ~100% model; a wrong label map would give ~0
    assert json.loads(json.dumps(result.to_dict()))["correct"] == result.correct


def test_unknown_class_and_missing_versions(tmp_path: Path) -> None:
    for label in ("cat", "dog"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        Image.new("L", (8, 8), 0).save(tmp_path / "imgs" / label / "a.png")
    with pytest.raises(evaluate.EvaluateError, match=r"\['cat', 'dog'\] are not among model 'digits_lenet'"):
        evaluate.evaluate_model_dir(SHIPPED, f"imagefolder:{tmp_path / 'imgs'}", split="all")
    with pytest.raises(evaluate.EvaluateError, match=r"has no version 7; available: \[1\]"):
        evaluate.evaluate_model_dir(SHIPPED, "digits", version=7)
    with pytest.raises(evaluate.EvaluateError, match="does not exist"):
        evaluate.resolve_version(tmp_path / "nothing", None)
    with pytest.raises(evaluate.EvaluateError, match=r"no config\.json"):
        evaluate.evaluate_model_dir(tmp_path, "digits")


UNSEEN_FONTS_TARGET = 0.95  # issue 16: printed digits of font families never trained on
MNIST_STYLE_TARGET = 0.97  # issue 16's aim for handwriting in MNIST's style, held to on our proxy


def test_shipped_model_generalises_to_held_out_sets(capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    """The generalisation sets: unseen fonts under unseen transformations, and held-out scans drawn in
    MNIST's style. Their fonts come from scripts/install_system_deps.sh; missing fonts fail under CI."""
    from convserve.cli import main
    from convserve.models import fonts

    try:
        fonts.unseen_fonts()
    except fonts.FontsMissingError as exc:
        unavailable(str(exc))
    assert main(["evaluate", "--model-dir", str(SHIPPED), "--generalisation", "--json"]) == 0
    rows = {r["data"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(rows) == ["digits", "digits-mnist-style", "fonts-unseen"]
    assert rows["digits"]["total"] == 359 and rows["digits"]["accuracy"] >= TARGET_ACCURACY
    assert rows["digits-mnist-style"]["total"] == 359
    assert rows["digits-mnist-style"]["accuracy"] >= MNIST_STYLE_TARGET, rows["digits-mnist-style"]
    assert rows["fonts-unseen"]["total"] == 2000
    assert rows["fonts-unseen"]["accuracy"] >= UNSEEN_FONTS_TARGET, rows["fonts-unseen"]
    assert min(rows["fonts-unseen"]["per_class_accuracy"].values()) >= 0.85

    png = tmp_path / "samples.png"
    argv = ["evaluate", "--model-dir", str(SHIPPED), "--data", "digits", "--data", "digits-mnist-style",
            "--samples", str(png)]
    assert main(argv) == 0
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 20_000
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "model digits_lenet version 1" and len(table) == 4
    assert table[2].startswith("digits ") and table[3].startswith("digits-mnist-style ")
