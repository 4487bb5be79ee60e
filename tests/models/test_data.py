"""Datasets: the digits conversion, the fixed stratified split, image folders, train/serve pixel parity."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits as sk_load_digits

from convserve.models import data
from convserve.server.runtime.preprocess import decode_image


@pytest.fixture(scope="module")
def digits() -> data.ImageDataset:
    return data.load_dataset("digits")


def test_digits_are_sklearn_digits_as_8bit(digits: data.ImageDataset) -> None:
    reference = sk_load_digits()
    assert len(digits) == 1797 == len(reference.target)
    assert digits.class_names == tuple("0123456789")
    np.testing.assert_array_equal(digits.labels, reference.target)
    for i in (0, 1, 500, 1796):
        img = digits.load(i)
        assert img.mode == "L" and img.size == (8, 8)
        expected = np.rint(reference.images[i] / 16.0 * 255.0)
        np.testing.assert_array_equal(np.asarray(img), expected)


def test_split_is_fixed_stratified_and_disjoint(digits: data.ImageDataset) -> None:
    np.random.seed(123)  # global RNG state must not matter
    train_a, test_a = data.split_indices(digits.labels)
    np.random.seed(456)
    train_b, test_b = data.split_indices(digits.labels)
    np.testing.assert_array_equal(train_a, train_b)
    np.testing.assert_array_equal(test_a, test_b)
    assert set(train_a).isdisjoint(test_a)
    assert sorted([*train_a, *test_a]) == list(range(len(digits)))
    for cls in range(10):
        n_class = int((digits.labels == cls).sum())
        n_test = int((digits.labels[test_a] == cls).sum())
        assert n_test == round(data.TEST_FRACTION * n_class)
    assert 0.19 < len(test_a) / len(digits) < 0.21
    _, other = data.split_indices(digits.labels, seed=data.SPLIT_SEED + 1)
    assert not np.array_equal(other, test_a)


def test_split_keeps_every_class_on_both_sides_when_tiny() -> None:
    labels = np.array([0, 0, 1, 1, 1, 2])
    train, test = data.split_indices(labels)
    assert sorted(labels[test].tolist()) == [0, 1]  # class 2 has one image: it can only train
    assert sorted(labels[train].tolist()) == [0, 1, 1, 2]


def test_training_pixels_equal_what_the_server_computes_from_a_png(digits: data.ImageDataset) -> None:
    cfg = data.model_config_for(digits, "digits_lenet", "L", 28)
    indices = [3, 42, 1000]
    arrays = data.to_arrays(digits, indices, cfg)
    assert arrays.shape == (3, 1, 28, 28) and arrays.dtype == np.float32
    for row, i in enumerate(indices):
        buffer = io.BytesIO()
        digits.load(i).save(buffer, format="PNG")
        np.testing.assert_array_equal(arrays[row], decode_image(buffer.getvalue(), cfg))
    assert arrays.min() >= -1.0 and arrays.max() <= 1.0


def _solid(path: Path, mode: str, color: int | tuple[int, int, int], size: tuple[int, int] = (12, 9)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_imagefolder_reads_rgb_and_grayscale_png_and_jpeg(tmp_path: Path) -> None:
    _solid(tmp_path / "red" / "a.png", "RGB", (200, 10, 10))
    _solid(tmp_path / "red" / "b.JPG", "RGB", (200, 10, 10))
    _solid(tmp_path / "gray" / "c.png", "L", 100)
    _solid(tmp_path / "gray" / "d.jpeg", "L", 100)
    (tmp_path / "gray" / "notes.txt").write_text("not an image")
    ds = data.load_dataset(f"imagefolder:{tmp_path}")
    assert ds.class_names == ("gray", "red")
    assert ds.labels.tolist() == [0, 0, 1, 1]

    rgb = data.model_config_for(ds, "colours", "RGB", 16)
    x = data.to_arrays(ds, range(4), rgb)
    assert x.shape == (4, 3, 16, 16)
    norm = lambda v: (v / 255.0 - 0.5) / 0.5  # noqa: E731
    np.testing.assert_allclose(x[0], norm(100.0), atol=1e-6)  # lossless grayscale PNG → equal RGB channels
    np.testing.assert_allclose(x[2, 0], norm(200.0), atol=1e-6)
    np.testing.assert_allclose(x[2, 1], norm(10.0), atol=1e-6)
    np.testing.assert_allclose(x[3], x[2], atol=0.05)  # JPEG: close, not exact

    gray = data.model_config_for(ds, "colours", "L", 8)
    y = data.to_arrays(ds, range(4), gray)
    assert y.shape == (4, 1, 8, 8)
    np.testing.assert_allclose(y[0], norm(100.0), atol=1e-6)
    luma = round(0.299 * 200 + 0.587 * 10 + 0.114 * 10)  # Pillow's RGB → L weights
    np.testing.assert_allclose(y[2], norm(float(luma)), atol=1 / 127.5)


def test_model_config_for_carries_labels_and_preprocessing(tmp_path: Path) -> None:
    _solid(tmp_path / "a" / "x.png", "L", 0)
    _solid(tmp_path / "b b" / "y.png", "L", 255)
    ds = data.load_dataset(f"imagefolder:{tmp_path}")
    cfg = data.model_config_for(ds, "my run/with spaces", "RGB", 32)
    assert cfg.name == "my_run_with_spaces"
    assert cfg.labels == ("a", "b b")
    assert cfg.input.shape == (3, 32, 32)
    assert cfg.preprocessing.resize == (32, 32) and cfg.preprocessing.color_mode == "RGB"


@pytest.mark.parametrize(
    ("layout", "spec_suffix", "message"),
    [
        ({}, "/missing", "does not exist"),
        ({"only/x.png": "png"}, "", "at least 2 class sub-folders"),
        ({"a/x.png": "png", "b/readme.txt": "text"}, "", "holds no"),
        ({"a/x.png": "png", "b/": None}, "", "holds no"),
        ({"file.png": "png"}, "/file.png", "is not a directory"),
    ],
)
def test_imagefolder_errors_name_the_problem(tmp_path: Path, layout: dict, spec_suffix: str,
                                             message: str) -> None:
    for rel, kind in layout.items():
        target = tmp_path / rel
        if kind is None:
            target.mkdir(parents=True)
        elif kind == "png":
            _solid(target, "L", 0)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(kind)
    with pytest.raises(data.DataError, match=message):
        data.load_dataset(f"imagefolder:{tmp_path}{spec_suffix}")


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    _solid(tmp_path / "a" / "good.png", "L", 0)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ds = data.load_dataset(f"imagefolder:{tmp_path}")
    with pytest.raises(data.DataError, match=r"broken\.png: cannot read image"):
        ds.load(1)


@pytest.mark.parametrize("spec", ["mnist", "imagefolder:", ""])
def test_unknown_data_spec(spec: str) -> None:
    with pytest.raises(data.DataError):
        data.load_dataset(spec)


def test_subset_keeps_classes_and_maps_images(digits: data.ImageDataset) -> None:
    sub = digits.subset([10, 20, 30])
    assert len(sub) == 3 and sub.class_names == digits.class_names
    assert sub.labels.tolist() == digits.labels[[10, 20, 30]].tolist()
    np.testing.assert_array_equal(np.asarray(sub.load(1)), np.asarray(digits.load(20)))
