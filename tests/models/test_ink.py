"""The ink normalisation declared in a model's config: polarity, ink box and centring by mass, shared by
training and serving; configs without it keep their meaning."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from convserve.common.model_config import ModelConfig, ModelConfigError, Preprocessing
from convserve.server.runtime.preprocess import decode_image, image_to_array, normalize_ink

LABELS = tuple("0123456789")
INK = ModelConfig(name="ink", preprocessing=Preprocessing(polarity="auto", fit_ink=20),
                  labels=LABELS).validate()
PLAIN = ModelConfig(name="plain", labels=LABELS).validate()


def _seven(size: tuple[int, int], at: tuple[int, int], scale: float, paper: int = 0,
           ink: int = 255) -> Image.Image:
    """A thick '7' drawn with lines (no font needed) at ``at`` with its height ``40 * scale`` pixels."""
    img = Image.new("L", size, paper)
    x, y = at
    d = ImageDraw.Draw(img)
    w = max(2, round(6 * scale))
    d.line([(x, y), (x + 30 * scale, y), (x + 12 * scale, y + 40 * scale)], fill=ink, width=w)
    return img


def _geometry(arr: np.ndarray) -> tuple[float, float, int, int]:
    """(centre row, centre col) of mass and (height, width) of the pixels above half the maximum."""
    arr = np.asarray(arr, dtype=np.float64)
    total = arr.sum()
    cy = (arr.sum(axis=1) * (np.arange(arr.shape[0]) + 0.5)).sum() / total
    cx = (arr.sum(axis=0) * (np.arange(arr.shape[1]) + 0.5)).sum() / total
    ys, xs = np.nonzero(arr > arr.max() / 2)
    return cy, cx, int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)


@pytest.mark.parametrize(("size", "at", "scale"), [((200, 150), (20, 30), 2.0), ((64, 64), (30, 5), 0.6),
                                                   ((500, 400), (300, 250), 3.0)])
def test_the_ink_is_fitted_into_the_box_and_centred_by_mass(size: tuple[int, int], at: tuple[int, int],
                                                             scale: float) -> None:
    out = np.asarray(normalize_ink(_seven(size, at, scale), INK.preprocessing))
    assert out.shape == (28, 28)
    cy, cx, h, w = _geometry(out)
    assert abs(cy - 14) < 0.8 and abs(cx - 14) < 0.8  # the window's centre, within a sampling error
    assert 18 <= max(h, w) <= 22  # the longer side fills the 20-pixel box, the aspect kept
    assert w < h


def test_position_and_size_no_longer_matter() -> None:
    a = image_to_array(_seven((200, 150), (20, 30), 2.0), INK)
    b = image_to_array(_seven((300, 300), (150, 90), 3.0), INK)
    assert np.abs(a - b).mean() < 0.08  # both in [-1, 1]; the same digit up to resampling


def test_dark_ink_on_gray_paper_reads_as_light_ink_on_black() -> None:
    light_on_dark = image_to_array(_seven((120, 120), (30, 20), 1.5), INK)
    dark_on_paper = image_to_array(_seven((120, 120), (30, 20), 1.5, paper=210, ink=40), INK)
    np.testing.assert_allclose(light_on_dark, dark_on_paper, atol=0.02)
    assert light_on_dark.min() == -1.0  # the background is the model's black


def test_a_blank_image_is_all_background() -> None:
    for value in (0, 255, 130):
        out = image_to_array(Image.new("L", (50, 40), value), INK)
        assert out.shape == (1, 28, 28) and np.all(out == -1.0)


def test_a_stray_speck_does_not_move_the_digit() -> None:
    clean = _seven((200, 200), (60, 60), 2.0)
    dusty = clean.copy()
    dusty.putpixel((195, 3), 255)
    np.testing.assert_allclose(image_to_array(clean, INK), image_to_array(dusty, INK), atol=0.1)


def test_decode_uses_the_same_function_as_training() -> None:
    img = _seven((90, 70), (10, 10), 1.2, paper=240, ink=10)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    np.testing.assert_array_equal(decode_image(buf.getvalue(), INK), image_to_array(img, INK))


def test_configs_without_the_new_fields_keep_their_meaning() -> None:
    data = PLAIN.to_dict()
    del data["preprocessing"]["polarity"], data["preprocessing"]["fit_ink"]
    cfg = ModelConfig.from_dict(data)
    assert cfg.preprocessing.polarity == "as_is" and cfg.preprocessing.fit_ink is None
    img = _seven((56, 56), (5, 5), 1.0)
    expected = np.asarray(img.resize((28, 28), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    np.testing.assert_allclose(image_to_array(img, cfg)[0], (expected - 0.5) / 0.5, atol=1e-6)
    assert ModelConfig.from_dict(INK.to_dict()) == INK  # the new fields round-trip


@pytest.mark.parametrize(("changes", "message"), [
    ({"polarity": "flip"}, "preprocessing.polarity must be one of ('as_is', 'auto'), got 'flip'"),
    ({"fit_ink": 29}, "preprocessing.fit_ink must be in 1..28 (the resize window), got 29"),
    ({"fit_ink": 20, "color_mode": "RGB", "mean": (0.5,) * 3, "std": (0.5,) * 3},
     "preprocessing.polarity/fit_ink need color_mode 'L', got 'RGB'"),
])
def test_bad_ink_settings_are_named(changes: dict, message: str) -> None:
    pre = Preprocessing(**{**vars(Preprocessing()), **changes})
    with pytest.raises(ModelConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(name="m", preprocessing=pre, labels=LABELS).validate()


def test_dust_is_filtered_but_a_one_pixel_pen_line_is_kept() -> None:
    clean = _seven((160, 160), (50, 40), 2.0)
    dusty = np.array(clean)
    rng = np.random.default_rng(0)
    dusty[rng.random(dusty.shape) < 0.03] = 255  # 3% salt noise: a speckled scan
    cy, cx, h, _ = _geometry(np.asarray(normalize_ink(Image.fromarray(dusty), INK.preprocessing)))
    assert abs(cy - 14) < 1.0 and abs(cx - 14) < 1.0 and 17 <= h <= 23
    np.testing.assert_allclose(image_to_array(Image.fromarray(dusty), INK), image_to_array(clean, INK),
                               atol=0.35)  # the digit, not the dust, fills the box

    thin = Image.new("L", (100, 100), 255)
    ImageDraw.Draw(thin).line([(30, 20), (60, 20), (40, 80)], fill=0, width=1)  # a fine pen on white
    out = image_to_array(thin, INK)
    # still there (fainter once shrunk to the box): the median filter is skipped when it would erase the ink
    assert (out > -0.8).sum() > 30
    assert 18 <= _geometry(out[0] + 1)[2] <= 22


def test_big_images_are_box_averaged_before_the_ink_is_normalised() -> None:
    """A photo-sized image is reduced to at most INK_WORK_SIDE pixels a side first: the model sees a 28-pixel
    window, and normalising 16 Mpx at full size cost over a second of CPU per image (issue #12's stall)."""
    from convserve.server.runtime.preprocess import INK_WORK_SIDE

    big = _seven((3000, 2000), (900, 500), 25.0, paper=230, ink=20)
    factor = -(-3000 // INK_WORK_SIDE)
    got = image_to_array(big, INK)
    np.testing.assert_array_equal(got, image_to_array(big.reduce(factor), INK))
    cy, cx, _, _ = _geometry(got[0] - got[0].min())
    assert abs(cy - 14) < 2 and abs(cx - 14) < 2  # still a centred digit
    small = _seven((64, 64), (10, 10), 1.0)
    assert max(small.size) <= INK_WORK_SIDE  # training-sized images are untouched by the reduction
