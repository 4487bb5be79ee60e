"""Digits the model never trained on, made by transformations it never trained with: the generalisation sets.

- ``fonts-unseen``: printed digits from the held-out font families (``fonts.unseen_fonts``), each through one
  or two transformations that ``synth.py`` never applies: a perspective warp, uneven lighting with low
  contrast, JPEG compression, pixelation, salt-and-pepper noise, or a morphological (min/max filter) change
  of stroke width — at font sizes from 14 to 90 px, dark on light or light on dark.
- ``digits-mnist-style``: the held-out side of scikit-learn's split (scans the model never saw) drawn the way
  MNIST is: upsampled with a Lanczos filter to fit a 20x20 box, thickened with a 3x3 max filter (a broad
  pen), blurred (anti-aliasing), centred by mass in 28x28, white on black. A proxy for handwriting in
  MNIST's style built from data we may use — not MNIST.

Each image is a pure function of (a constant seed, its index).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from . import synth

UNSEEN_SEED = 16_003
UNSEEN_SIZE = 2000  # 51 font files x 10 digits x about 4 renderings


def unseen_font_digit(index: int, fonts: tuple[Path, ...]) -> tuple[Image.Image, int]:
    """Sample ``index`` of the unseen-fonts set: (image, digit); font and digit cycle with the index."""
    rng = np.random.default_rng([UNSEEN_SEED, index])
    digit = index % 10
    font = fonts[(index // 10) % len(fonts)]
    size = int(rng.integers(14, 90))
    img = synth.glyph(digit, font, size, margin=size // 2)  # white ink on black, padded
    for name in rng.choice(sorted(_TRANSFORMS), size=int(rng.integers(1, 3)), replace=False):
        img = _TRANSFORMS[str(name)](img, rng, size)
    return img, digit


def _perspective(img: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """A sheet photographed at an angle: each corner moved by up to 12% of the side. The sheet goes on beyond
    the frame, so what comes into view is paper (the border's median), not a black wedge."""
    w, h = img.size
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    moved = corners + rng.uniform(-0.12, 0.12, corners.shape) * [w, h]
    coeffs = _perspective_coeffs(corners, moved)
    arr = np.asarray(img)
    paper = int(np.median(np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])))
    return img.transform((w, h), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BILINEAR,
                         fillcolor=paper)


def _perspective_coeffs(out_pts: np.ndarray, in_pts: np.ndarray) -> tuple[float, ...]:
    """PIL's 8 perspective coefficients mapping output points to input points."""
    rows = []
    for (x, y), (u, v) in zip(out_pts, in_pts, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    solution = np.linalg.solve(np.asarray(rows), in_pts.reshape(-1))
    return tuple(float(c) for c in solution)


def _uneven_light(img: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """Dark ink on paper lit from one side: a linear gradient background, contrast as low as 60 levels."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    h, w = arr.shape
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * np.linspace(-1, 1, w)[None, :] + np.sin(angle) * np.linspace(-1, 1, h)[:, None])
    paper = rng.uniform(170, 235) + rng.uniform(10, 35) * ramp
    ink = paper - rng.uniform(60, 150)
    out = paper * (1 - arr) + ink * arr
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="L")


def _jpeg(img: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """Saved as a low-quality JPEG (blocking and ringing artefacts)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(10, 35)))
    buf.seek(0)
    with Image.open(buf) as decoded:
        return decoded.convert("L")


def _pixelate(img: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """Seen at low resolution: the digit's height brought down to 9-14 pixels, then blown up unsmoothed."""
    w, h = img.size
    factor = rng.uniform(9, 14) / size
    small = img.resize((max(2, round(w * factor)), max(2, round(h * factor))), Image.Resampling.BOX)
    return small.resize((w, h), Image.Resampling.NEAREST)


def _salt_pepper(img: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """Dust and dropouts: 1-3% of the pixels set to black or white."""
    arr = np.array(img, dtype=np.uint8)
    hit = rng.random(arr.shape) < rng.uniform(0.01, 0.03)
    arr[hit] = np.where(rng.random(int(hit.sum())) < 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L")


def _morphology(img: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """A bolder or finer pen: a max filter (thicker ink) or a min filter (thinner), 3 pixels wide, 5 from
    70-pixel digits up. Thinning that would erase the digit (less than half its ink left: thin fonts at
    small sizes) thickens instead — the set measures legible digits."""
    width = 5 if size >= 70 else 3
    if rng.random() < 0.5:
        thinner = img.filter(ImageFilter.MinFilter(width))
        if np.asarray(thinner, dtype=np.float64).sum() >= 0.5 * np.asarray(img, dtype=np.float64).sum():
            return thinner
    return img.filter(ImageFilter.MaxFilter(width))


def _invert(img: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """Dark ink on white (the other polarity), with the paper's gray level varied."""
    arr = np.asarray(img, dtype=np.float32)
    return Image.fromarray(np.clip(255 - arr * rng.uniform(0.7, 1.0), 0, 255).astype(np.uint8), mode="L")


_TRANSFORMS = {
    "invert": _invert,
    "jpeg": _jpeg,
    "morphology": _morphology,
    "perspective": _perspective,
    "pixelate": _pixelate,
    "salt_pepper": _salt_pepper,
    "uneven_light": _uneven_light,
}


def mnist_style(pixels: np.ndarray) -> Image.Image:
    """One 8x8 scan (uint8, ink white) drawn as MNIST draws a digit: see the module docstring."""
    ys, xs = np.nonzero(pixels > 0)
    if len(ys) == 0:
        return Image.new("L", (28, 28), 0)
    crop = Image.fromarray(pixels[ys.min():ys.max() + 1, xs.min():xs.max() + 1], mode="L")
    scale = 20.0 / max(crop.size)
    crop = crop.resize((max(1, round(crop.size[0] * scale)), max(1, round(crop.size[1] * scale))),
                       Image.Resampling.LANCZOS)
    crop = crop.filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.GaussianBlur(0.8))
    arr = np.asarray(crop, dtype=np.float32)
    arr = np.clip(arr * (255.0 / max(float(arr.max()), 1.0)), 0, 255)
    total = float(arr.sum())
    cy = float((arr.sum(axis=1) * np.arange(arr.shape[0])).sum() / total)
    cx = float((arr.sum(axis=0) * np.arange(arr.shape[1])).sum() / total)
    canvas = Image.new("L", (28, 28), 0)
    canvas.paste(Image.fromarray(arr.astype(np.uint8), mode="L"), (round(13.5 - cx), round(13.5 - cy)))
    return canvas
