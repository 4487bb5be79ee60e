"""The training loop: augmentation against a per-sample reference, determinism under a seed, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from convserve.models import data, train
from convserve.testing.prerequisites import unavailable


@pytest.fixture(scope="module")
def tiny_digits() -> data.ImageDataset:
    """12 digits per class: a split of 100 train / 20 test images, enough to exercise every path."""
    full = data.load_dataset("digits")
    picks = np.concatenate([np.flatnonzero(full.labels == c)[:12] for c in range(10)])
    return full.subset(picks)


def _options(**overrides: object) -> train.TrainOptions:
    base = {"epochs": 1, "batch_size": 32, "progress": False, "threads": 1}
    base.update(overrides)
    return train.TrainOptions(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("max_shift", [1, 3])
def test_random_shift_matches_a_per_sample_crop(max_shift: int) -> None:
    x = torch.randn(5, 2, 7, 9)
    got = train.random_shift(x, max_shift, torch.Generator().manual_seed(7))
    shifts = torch.randint(0, 2 * max_shift + 1, (2, 5), generator=torch.Generator().manual_seed(7))
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    for n in range(5):
        dy, dx = int(shifts[0, n]), int(shifts[1, n])
        torch.testing.assert_close(got[n], padded[n, :, dy:dy + 7, dx:dx + 9], rtol=0, atol=0)


def test_random_shift_zero_is_identity() -> None:
    x = torch.randn(2, 1, 4, 4)
    assert train.random_shift(x, 0, torch.Generator()) is x


def test_same_seed_same_weights_other_seed_other_weights(tiny_digits: data.ImageDataset) -> None:
    a = train.train(tiny_digits, _options(seed=3), None)
    b = train.train(tiny_digits, _options(seed=3), None)
    c = train.train(tiny_digits, _options(seed=4), None)
    state_a, state_b, state_c = (r.model.state_dict() for r in (a, b, c))
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=0, msg=key)
    assert a.history == b.history
    assert any(not torch.equal(state_a[k], state_c[k]) for k in state_a if state_a[k].is_floating_point())


def test_train_writes_a_weights_only_checkpoint_and_plots(tiny_digits: data.ImageDataset,
                                                          tmp_path: Path) -> None:
    threads_before = torch.get_num_threads()
    result = train.train(tiny_digits, _options(epochs=2, seed=0), tmp_path)
    assert torch.get_num_threads() == threads_before  # global torch settings are restored

    ckpt = torch.load(tmp_path / train.CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    assert ckpt["arch"] == "lenet"
    assert ckpt["arch_kwargs"] == {"in_channels": 1, "num_classes": 10, "input_size": 28, "width": 1.0}
    assert ckpt["model_config"]["labels"] == list("0123456789")
    assert ckpt["model_config"]["preprocessing"]["color_mode"] == "L"
    assert ckpt["data"]["split_seed"] == data.SPLIT_SEED
    assert len(ckpt["history"]["train_loss"]) == 2
    metrics = ckpt["metrics"]
    assert metrics["test_size"] == 20 and metrics["train_size"] == 100
    assert np.asarray(metrics["confusion"]).sum() == 20
    assert metrics["test_correct"] == np.trace(np.asarray(metrics["confusion"]))

    for name in (train.CURVES_FILE, train.CONFUSION_FILE):
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG" and img.size[0] > 200

    model, cfg = train.load_checkpoint(tmp_path / train.CHECKPOINT_FILE)
    assert cfg.labels == tuple("0123456789") and cfg.architecture == "lenet"
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.model(x))


def test_test_accuracy_is_measured_on_the_fixed_split(tiny_digits: data.ImageDataset) -> None:
    result = train.train(tiny_digits, _options(seed=1), None)
    _, test_idx = data.split_indices(tiny_digits.labels)
    cfg = result.config
    x = torch.from_numpy(data.to_arrays(tiny_digits, test_idx, cfg))
    with torch.no_grad():
        predicted = result.model(x).argmax(1).numpy()
    expected = float((predicted == tiny_digits.labels[test_idx]).mean())
    assert result.metrics["test_accuracy"] == pytest.approx(expected)


def test_unknown_arch_and_unusable_device(tiny_digits: data.ImageDataset) -> None:
    with pytest.raises(train.TrainError, match="unknown architecture 'nope'"):
        train.train(tiny_digits, _options(arch="nope"), None)
    if not torch.cuda.is_available():
        with pytest.raises(train.TrainError, match="CUDA is not available"):
            train.train(tiny_digits, _options(device="cuda"), None)


def test_load_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(train.TrainError, match="does not exist"):
        train.load_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(train.TrainError, match="cannot be read"):
        train.load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(train.TrainError, match="not written by `convserve train`"):
        train.load_checkpoint(foreign)


def test_digits_synth_training_is_deterministic_and_declares_its_preprocessing() -> None:
    """The bundled model's recipe in miniature: the same seed gives the same weights, and the config the
    model is exported with carries the ink normalisation its training images went through."""
    try:
        mixed = data.load_digits_synth(scan_copies=0, font_samples=40)
    except data.DataError as exc:  # here only missing fonts (scripts/install_system_deps.sh) raise it
        unavailable(str(exc))
    options = _options(seed=5, fit_ink=mixed.default_fit_ink)
    a = train.train(mixed, options, None)
    b = train.train(mixed, options, None)
    for key, value in a.model.state_dict().items():
        torch.testing.assert_close(value, b.model.state_dict()[key], rtol=0, atol=0, msg=key)
    pre = a.config.preprocessing
    assert (pre.polarity, pre.fit_ink, pre.resize) == ("auto", 20, (28, 28))
    assert a.metrics["test_size"] == 359 and a.metrics["train_size"] == 1438 + 40
