"""Digits drawn the many ways people print and write them: the variation the digits model trains on.

Two sources, each image a pure function of (a constant seed, its index), so a dataset is rebuilt bit for bit
by any process: printed digits rendered from the training fonts (``fonts.train_fonts``), and scikit-learn's
training scans redrawn at a higher resolution. Each then gets a random subset of: stroke width, scale,
aspect, position, rotation, shear, elastic distortion, blur, Gaussian noise, ink/paper levels, polarity.
The held-out transformations live in ``generalisation.py`` and are never used here.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# Seeds of the synthetic data: part of the dataset's definition (like data.SPLIT_SEED), never of --seed.
FONT_SEED = 16_001
SCAN_SEED = 16_002


@functools.lru_cache(maxsize=4096)
def load_font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size)


def glyph(digit: int, font_path: Path, size: int, stroke: int = 0, margin: int = 0) -> Image.Image:
    """The digit drawn white on black with ``stroke`` extra pixels of outline, ``margin`` px all round."""
    font = load_font(font_path, size)
    text = str(digit)
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    img = Image.new("L", (right - left + 2 * margin, bottom - top + 2 * margin), 0)
    ImageDraw.Draw(img).text((margin - left, margin - top), text, fill=255, font=font, stroke_width=stroke,
                             stroke_fill=255)
    return img


def affine(img: Image.Image, rng: np.random.Generator, rotate: float, shear: float,
           stretch: float) -> Image.Image:
    """Rotate (degrees), shear and stretch about the centre, on a canvas big enough to hold the result."""
    angle = np.deg2rad(rng.uniform(-rotate, rotate))
    k = rng.uniform(-shear, shear)
    sx = rng.uniform(1.0 - stretch, 1.0 + stretch)
    sy = rng.uniform(1.0 - stretch, 1.0 + stretch)
    cos, sin = np.cos(angle), np.sin(angle)
    forward = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, k], [0.0, 1.0]]) @ np.diag([sx, sy])
    w, h = img.size
    side = int(np.ceil(max(w, h) * 1.6)) + 2
    inverse = np.linalg.inv(forward)  # PIL maps output pixels back to input ones
    centre_out = np.array([side / 2, side / 2])
    centre_in = np.array([w / 2, h / 2])
    offset = centre_in - inverse @ centre_out
    coeffs = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    return img.transform((side, side), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=0)


def elastic(img: Image.Image, rng: np.random.Generator, alpha: float, sigma: float) -> Image.Image:
    """Simard et al.'s elastic distortion: a random displacement field smoothed by a Gaussian of ``sigma``
    pixels and scaled to ``alpha`` pixels, resampled bilinearly — wobbly strokes, as a hand draws them."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    arr = np.asarray(img, dtype=np.float32)
    h, w = arr.shape
    dy = gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="constant")
    dx = gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="constant")
    norm = max(float(np.abs(dy).max()), float(np.abs(dx).max()), 1e-6)
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    coords = (rows + dy * (alpha / norm), cols + dx * (alpha / norm))
    out = map_coordinates(arr, coords, order=1, mode="constant", cval=0.0)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), mode="L")


def finish(img: Image.Image, rng: np.random.Generator, height: float, *, noise: float = 10.0) -> Image.Image:
    """Blur (relative to the digit's ``height`` in pixels), ink and paper levels, Gaussian noise, random
    polarity: what a camera or scanner adds."""
    if rng.random() < 0.4:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.04 * height + 0.2)))
    arr = np.asarray(img, dtype=np.float32) / 255.0  # ink 1, background 0
    paper = rng.uniform(0, 60)
    ink = rng.uniform(paper + 120, 255)
    arr = paper + arr * (ink - paper)
    if rng.random() < 0.5:
        arr = arr + rng.normal(0.0, rng.uniform(0.0, noise), arr.shape)
    if rng.random() < 0.5:  # dark ink on light paper
        arr = 255.0 - arr
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def font_digit(index: int, fonts: tuple[Path, ...]) -> tuple[Image.Image, int]:
    """Training sample ``index`` of the printed digits: (image, digit). Font and digit cycle with the index,
    so every (font, digit) pair appears equally often; the rest is drawn from the index's own generator."""
    rng = np.random.default_rng([FONT_SEED, index])
    digit = index % 10
    font = fonts[(index // 10) % len(fonts)]
    size = int(rng.integers(18, 48))
    stroke = int(rng.choice([0, 0, 0, 1, 1, 2])) * max(1, size // 32)
    img = glyph(digit, font, size, stroke=stroke, margin=size // 3)
    if rng.random() < 0.5:
        img = pen(img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.025 * size + 0.3))), rng, 0.25, 0.7)
    img = affine(img, rng, rotate=15.0, shear=0.3, stretch=0.15)
    if rng.random() < 0.5:
        img = elastic(img, rng, alpha=rng.uniform(0.5, 0.06 * img.size[0] + 0.5), sigma=0.12 * img.size[0])
    img = _place(img, rng)
    return finish(img, rng, height=size), digit


def scan_digit(pixels: np.ndarray, index: int) -> Image.Image:
    """An 8x8 scikit-learn scan (uint8, ink white) redrawn at 32x32 with a random pen: the upsampled
    blob passed through a random contrast curve (thin to thick strokes), then the geometric and sensor
    variation the font digits get."""
    rng = np.random.default_rng([SCAN_SEED, index])
    img = Image.fromarray(pixels, mode="L").resize((32, 32), Image.Resampling.BICUBIC)
    img = pen(img, rng, low=0.1, high=0.6)
    img = affine(img, rng, rotate=12.0, shear=0.25, stretch=0.12)
    if rng.random() < 0.5:
        img = elastic(img, rng, alpha=rng.uniform(0.5, 2.5), sigma=4.0)
    img = _place(img, rng)
    return finish(img, rng, height=28.0)


def pen(img: Image.Image, rng: np.random.Generator, low: float, high: float) -> Image.Image:
    """A random contrast curve: a sigmoid whose midpoint, drawn from [low, high], is where the pen's edge
    falls on the ink's soft slope — low for a broad pen, high for a fine one."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    level = rng.uniform(low, high)
    sharpness = rng.uniform(4.0, 12.0)
    arr = 1.0 / (1.0 + np.exp(-sharpness * (arr - level)))
    arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-6)
    return Image.fromarray(np.rint(arr * 255).astype(np.uint8), mode="L")


def _place(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Put the digit at a random position on a random-sized canvas (preprocessing must find it)."""
    w, h = img.size
    pad_x, pad_y = (int(rng.integers(0, max(2, w // 2))) for _ in range(2))
    canvas = Image.new("L", (w + pad_x + int(rng.integers(0, max(2, w // 2))),
                             h + pad_y + int(rng.integers(0, max(2, h // 2)))), 0)
    canvas.paste(img, (pad_x, pad_y))
    return canvas
