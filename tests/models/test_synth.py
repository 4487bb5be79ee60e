"""Synthesised training digits and the held-out generalisation sets: deterministic, apart, and sensible."""

from __future__ import annotations

import numpy as np
import pytest

from convserve.common.model_config import ModelConfig, Preprocessing
from convserve.models import data, fonts, generalisation, synth
from convserve.server.runtime.preprocess import image_to_array
from convserve.testing.prerequisites import unavailable

CFG = ModelConfig(name="m", preprocessing=Preprocessing(polarity="auto", fit_ink=20),
                  labels=data.DIGIT_CLASSES).validate()


@pytest.fixture(scope="module")
def font_sets() -> tuple[tuple, tuple]:
    """(training fonts, unseen fonts); their Debian packages come from scripts/install_system_deps.sh."""
    try:
        return fonts.train_fonts(), fonts.unseen_fonts()
    except fonts.FontsMissingError as exc:
        unavailable(str(exc))


def test_training_and_held_out_fonts_are_different_families(font_sets: tuple[tuple, tuple]) -> None:
    trained, unseen = font_sets
    assert len(trained) >= 40 and len(unseen) >= 40
    assert not {p.name for p in trained} & {p.name for p in unseen}
    stem = lambda p: p.stem.split("-")[0].split("_")[0].removesuffix("Bold")  # noqa: E731
    assert not {stem(p) for p in trained} & {stem(p) for p in unseen}


def test_missing_fonts_name_the_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fonts, "_installed", lambda: ())
    with pytest.raises(fonts.FontsMissingError, match=r"fonts-crosextra-carlito .*make system-deps"):
        fonts.unseen_fonts()
    with pytest.raises(data.DataError, match=r"^digits-synth: found 0 of the fonts"):
        data.load_digits_synth(scan_copies=0, font_samples=10)


def test_samples_are_a_function_of_their_index(font_sets: tuple[tuple, tuple]) -> None:
    trained, unseen = font_sets
    for make, fontlist in ((synth.font_digit, trained), (generalisation.unseen_font_digit, unseen)):
        a, digit_a = make(123, fontlist)
        b, digit_b = make(123, fontlist)
        c, digit_c = make(133, fontlist)  # the same digit, another drawing
        assert digit_a == digit_b == digit_c == 3
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert a.size != c.size or not np.array_equal(np.asarray(a), np.asarray(c))


def test_digits_synth_keeps_the_held_out_scans_out_of_training(font_sets: tuple[tuple, tuple]) -> None:
    plain = data.load_digits()
    mixed = data.load_digits_synth(scan_copies=2, font_samples=30)
    train_idx, test_idx = mixed.train_test()
    plain_train, plain_test = data.split_indices(plain.labels)
    assert np.array_equal(test_idx, plain_test)  # the same in-distribution test images as `--data digits`
    assert not set(train_idx) & set(test_idx)
    assert len(mixed) == len(plain) + 2 * len(plain_train) + 30 == len(train_idx) + len(test_idx)
    assert np.array_equal(mixed.labels[:len(plain)], plain.labels)
    # each redrawn scan carries the label of a training scan
    assert np.array_equal(mixed.labels[len(plain):len(plain) + 2 * len(plain_train)],
                          np.repeat(plain.labels[plain_train], 2))
    for i in (0, len(plain) + 5, len(mixed) - 1):
        x = image_to_array(mixed.load(i), CFG)
        assert x.shape == (1, 28, 28) and x.min() >= -1.0 and x.max() <= 1.0 and x.max() > 0.5


def test_held_out_sets_are_all_test_data(font_sets: tuple[tuple, tuple]) -> None:
    unseen = data.load_fonts_unseen(size=40)
    assert len(unseen.train_test()[0]) == 0 and len(unseen.train_test()[1]) == 40
    assert np.array_equal(unseen.labels, np.arange(40) % 10)
    mnist = data.load_dataset("digits-mnist-style")
    _, plain_test = data.split_indices(data.load_digits().labels)
    assert len(mnist) == len(plain_test) == len(mnist.train_test()[1])


def test_mnist_style_is_a_centred_digit_in_a_20_pixel_box() -> None:
    digits = data.load_digits()
    for i in range(10):
        img = np.asarray(generalisation.mnist_style(np.asarray(digits.load(i))), dtype=np.float64)
        assert img.shape == (28, 28) and img.max() == 255
        ys, xs = np.nonzero(img > 128)
        assert max(np.ptp(ys), np.ptp(xs)) + 1 <= 23  # 20 px box, the pen and blur widen it a little
        cy = (img.sum(axis=1) * np.arange(28)).sum() / img.sum()
        cx = (img.sum(axis=0) * np.arange(28)).sum() / img.sum()
        assert abs(cy - 13.5) <= 1.0 and abs(cx - 13.5) <= 1.0
