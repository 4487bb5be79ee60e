"""`convserve train | export | evaluate | archs` end to end, and one-line errors that leave nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convserve.cli import main
from convserve.models import data

CONVSERVE = Path(sys.executable).with_name("convserve")


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's image folder: 6 PNGs per digit class, the class name as folder name."""
    digits = data.load_dataset("digits")
    root = tmp_path_factory.mktemp("digit_pngs")
    for cls in range(10):
        (root / str(cls)).mkdir()
        for i in np.flatnonzero(digits.labels == cls)[:6]:
            digits.load(int(i)).save(root / str(cls) / f"{i}.png")
    return root


def _one_error_line(capsys: pytest.CaptureFixture[str], rc: int, expected: str) -> None:
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err.startswith("error: ") and expected in err, err
    assert "\n" not in err and "Traceback" not in err


def test_train_export_evaluate_on_an_image_folder(digit_folder: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    repo = tmp_path / "repo"
    rc = main(["train", "--arch", "lenet", "--data", f"imagefolder:{digit_folder}", "--color", "L",
               "--input-size", "20", "--epochs", "1", "--seed", "0", "--out", str(run), "--no-progress",
               "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "epoch   1/1" in out and "test accuracy" in out
    assert {p.name for p in run.iterdir()} == {"checkpoint.pt", "training_curves.png", "confusion_matrix.png"}

    rc = main(["export", "--checkpoint", str(run / "checkpoint.pt"), "--name", "my_digits", "--version", "3",
               "--repository", str(repo), "--max-batch-size", "16"])
    assert rc == 0, capsys.readouterr().err
    assert "my_digits" in capsys.readouterr().out
    config = json.loads((repo / "my_digits" / "config.json").read_text())
    assert config["labels"] == [str(c) for c in range(10)]
    assert config["input"]["shape"] == [1, 20, 20] and config["max_batch_size"] == 16
    assert (repo / "my_digits" / "3" / "model.onnx").stat().st_size > 10_000

    rc = main(["evaluate", "--model-dir", str(repo / "my_digits"), "--data", f"imagefolder:{digit_folder}",
               "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["version"] == 3 and report["split"] == "test"
    assert report["total"] == 10  # round(0.2 * 6) = 1 held-out image per class
    assert 0.0 <= report["accuracy"] <= 1.0 and report["correct"] == round(report["accuracy"] * 10)

    # An existing version is never overwritten without --force, and stays intact.
    before = (repo / "my_digits" / "3" / "model.onnx").read_bytes()
    rc = main(["export", "--checkpoint", str(run / "checkpoint.pt"), "--name", "my_digits", "--version", "3",
               "--repository", str(repo)])
    _one_error_line(capsys, rc, "already exists")
    assert (repo / "my_digits" / "3" / "model.onnx").read_bytes() == before

    rc = main(["evaluate", "--model-dir", str(repo / "my_digits"), "--data", f"imagefolder:{digit_folder}",
               "--split", "all"])
    assert rc == 0 and "accuracy" in capsys.readouterr().out


def test_evaluate_shipped_model_text_report(capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(__file__).resolve().parents[2]
    assert main(["evaluate", "--model-dir", str(root / "model_repository" / "digits_lenet")]) == 0
    out = capsys.readouterr().out
    assert "digits_lenet version 1 on digits (test split)" in out and "/359)" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--arch", "nope"], "unknown architecture 'nope'; choose one of:"),
        (["train", "--data", "imagefolder:{tmp}/missing"], "does not exist"),
        (["train", "--data", "imagefolder:{tmp}/classes"], "holds no .png/.jpg/.jpeg images"),
        (["train", "--data", "mnist"], "unknown data source 'mnist'"),
        (["train", "--out", "{tmp}/afile/run"], "cannot create output folder"),
        (["train", "--epochs", "0"], "--epochs must be a positive integer"),
        (["train", "--color", "RGB"], "digits images are L"),
        (["train", "--fit-ink", "40", "--out", "{tmp}/run"],
         "preprocessing.fit_ink must be in 1..28 (the resize window), got 40"),
        (["train", "--fit-ink", "-1"], "--fit-ink must be >= 0, got -1"),
        (["evaluate", "--model-dir", "model_repository/digits_lenet", "--data", "mnist"],
         "unknown data source 'mnist'; expected one of 'digits', 'digits-synth', 'fonts-unseen'"),
        (["robustness", "--model-dir", "{tmp}/repo/none", "--out", "{tmp}/r.png"], "no config.json"),
        (["export", "--checkpoint", "{tmp}/missing.pt", "--name", "m", "--repository", "{tmp}/repo"],
         "does not exist"),
        (["evaluate", "--model-dir", "{tmp}/repo/none"], "no config.json"),
    ],
)
def test_bad_input_gives_one_line_and_writes_nothing(argv: list[str], expected: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "classes" / "full").mkdir(parents=True)
    (tmp_path / "classes" / "empty").mkdir()
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "classes" / "full" / "x.png")
    (tmp_path / "afile").write_text("a file, not a folder")
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    _one_error_line(capsys, rc, expected)
    assert not (tmp_path / "repo").exists()
    assert not (Path.cwd() / "runs" / "digits_nope").exists()


def test_export_into_an_unwritable_repository_leaves_no_entry(digit_folder: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from convserve.models import train

    run = tmp_path / "run"
    small = data.load_dataset(f"imagefolder:{digit_folder}")
    train.train(small, train.TrainOptions(epochs=1, input_size=16, color_mode="L", progress=False, threads=1),
                run)
    (tmp_path / "afile").write_text("")
    rc = main(["export", "--checkpoint", str(run / "checkpoint.pt"), "--name", "m",
               "--repository", str(tmp_path / "afile" / "repo")])
    _one_error_line(capsys, rc, "cannot create model repository")
    rc = main(["export", "--checkpoint", str(run / "checkpoint.pt"), "--name", "bad/name",
               "--repository", str(tmp_path / "repo")])
    _one_error_line(capsys, rc, "name must match")
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_real_subprocess_error_and_light_import() -> None:
    proc = subprocess.run([str(CONVSERVE), "train", "--arch", "nope", "--data", "digits"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: unknown architecture 'nope'")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    probe = ("import sys, convserve.models.cli; "
             "print(sorted({'torch', 'onnxruntime', 'sklearn'} & set(sys.modules)))")
    light = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                           check=True)
    assert light.stdout.strip() == "[]"


def test_archs_lists_every_architecture_beside_the_mlp(capsys: pytest.CaptureFixture[str]) -> None:
    from convserve.models.registry import build, list_architectures

    assert main(["archs", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(list_architectures()) <= set(rows)
    mlp = rows["mlp-10k"]["params"]
    assert mlp == 300 * 300 * 10_000 + 10_000 + 10_000 * 1000 + 1000  # ~1e9: the seed's point
    lenet = build("lenet")
    assert rows["lenet"]["params"] == sum(p.numel() for p in lenet.parameters())
    assert rows["lenet"]["params"] < mlp / 1000
    assert main(["archs"]) == 0
    table = capsys.readouterr().out
    assert "mlp-10k" in table and "lenet" in table and "GFLOPs" in table
