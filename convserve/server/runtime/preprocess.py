"""Image bytes or raw tensors → validated float32 NCHW arrays (pure functions, no I/O).

Training, evaluation and serving all call ``image_to_array`` so that a model sees exactly the
same pixels offline and online.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from convserve.common.model_config import ModelConfig, Preprocessing

from ..errors import InvalidInputError

DEFAULT_MAX_PIXELS = 16_000_000

# The pixel limit is ours, per call (ImageLimits.max_pixels), checked from the header before decoding.
# Pillow's process-wide default would warn at ~89 Mpx and refuse at ~179 Mpx with a message that hides the
# size, and a global cannot follow per-server settings; so it is switched off here, explicitly.
Image.MAX_IMAGE_PIXELS = None
DEFAULT_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")


@dataclass(frozen=True)
class ImageLimits:
    """Guards applied before and during decoding (decompression-bomb and format guards)."""

    max_encoded_bytes: int = 8 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    formats: tuple[str, ...] = DEFAULT_FORMATS


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert any Pillow mode (palette, alpha, 16-bit, CMYK, ...) to "L" or "RGB"."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * 255.0, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite onto black so transparent pixels read as background, as in training data.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != mode:
        img = img.convert(mode)
    return img


# Ink normalisation reads every pixel several times (~80 ns each), and a 16-Mpx photo cost over a second of
# CPU that no stop check could interrupt. Box-averaging anything bigger down to at most this many pixels a
# side first keeps it to milliseconds and loses nothing a 28-pixel model window could use; training images
# (under 128 pixels) never reach it, so served and trained preprocessing stay the same function.
INK_WORK_SIDE = 256


def image_to_array(img: Image.Image, cfg: ModelConfig) -> np.ndarray:
    """Convert, (normalize the ink,) resize and normalize one Pillow image → (C, H, W) float32."""
    pre = cfg.preprocessing
    img = _to_mode(img, pre.color_mode)
    if pre.polarity != "as_is" or pre.fit_ink is not None:
        if max(img.size) > INK_WORK_SIDE:
            img = img.reduce(-(-max(img.size) // INK_WORK_SIDE))
        img = normalize_ink(img, pre)
    h, w = pre.resize
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    if arr.ndim == 2:
        arr = arr[:, :, None]  # (H, W, 1)
    arr = arr.transpose(2, 0, 1)  # (C, H, W)
    mean = np.asarray(pre.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(pre.std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((arr - mean) / std, dtype=np.float32)


# Ink weights for the geometry: pixels below INK_LOW of the ink's contrast range count as background,
# above INK_HIGH fully, so faint noise and paper texture move neither the box nor the centre of mass.
INK_LOW, INK_HIGH = 0.25, 0.6
# The box is the range holding all but this fraction of the ink mass at each end: a stray speck far from
# the digit cannot stretch it, while a stroke carries far more than this share.
INK_TAIL = 0.01
# Images at least this many pixels on a side are despeckled (small ones, like 8x8 scans, have no pixel to
# spare); the filter is kept when at least DESPECKLE_KEEP of the ink survives it.
DESPECKLE_MIN_SIDE, DESPECKLE_KEEP = 32, 0.7


def normalize_ink(img: Image.Image, pre: Preprocessing) -> Image.Image:
    """Grayscale image → light ink on black, the ink scaled into a ``fit_ink`` box, centred by mass.

    Why: people send dark digits on white paper, at any size and anywhere in the frame, lit unevenly; MNIST-
    style models expect a white digit of a fixed size centred in the window. ``polarity == "auto"`` inverts
    an image whose border median is above mid-gray. The background is then a plane fitted to the border (so
    light falling from one side cancels out) and maps to 0, the brightest ink to 255, and ink pixels with no
    ink neighbour (dust, sensor noise) to 0. With ``fit_ink`` the result is ``pre.resize`` pixels: the ink's
    mass-robust bounding box scaled, aspect kept, so its longer side spans ``fit_ink`` pixels, the centre of
    mass at the window's centre. A blank image comes back black. Returns an "L" image.
    """
    arr = np.asarray(img, dtype=np.float32)  # (H, W) in 0..255
    h, w = arr.shape
    ys, xs = _border(h, w)
    if pre.polarity == "auto" and float(np.median(arr[ys, xs])) > 127.5:
        arr = 255.0 - arr
    arr = arr - _background_plane(arr[ys, xs], ys, xs, h, w)
    peak = float(arr.max())
    out_h, out_w = pre.resize if pre.fit_ink is not None else (h, w)
    if peak < 1.0:  # no ink at all
        return Image.new("L", (out_w, out_h), 0)
    arr = np.clip(arr * (255.0 / peak), 0.0, 255.0)
    if min(h, w) >= DESPECKLE_MIN_SIDE:
        arr = _despeckle(arr)
    weight = np.clip((arr / 255.0 - INK_LOW) / (INK_HIGH - INK_LOW), 0.0, 1.0)  # (H, W) how surely ink
    isolated = _ink_neighbours(weight > 0) == 0
    arr[isolated & (weight > 0)] = 0.0
    weight[isolated] = 0.0
    if pre.fit_ink is None:
        return Image.fromarray(np.rint(arr).astype(np.uint8), mode="L")
    rows, cols = weight.sum(axis=1), weight.sum(axis=0)
    total = float(rows.sum())
    if total <= 0.0:  # only faint ink: weigh by intensity instead
        rows, cols = arr.sum(axis=1), arr.sum(axis=0)
        total = float(rows.sum())
        if total <= 0.0:
            return Image.new("L", (out_w, out_h), 0)
    cy = float((rows * np.arange(len(rows))).sum() / total) + 0.5  # pixel centres sit at i + 0.5
    cx = float((cols * np.arange(len(cols))).sum() / total) + 0.5
    extent = max(_mass_extent(rows, total), _mass_extent(cols, total))
    scale = pre.fit_ink / extent  # output pixels per source pixel
    source = Image.fromarray(np.rint(arr).astype(np.uint8), mode="L")
    reduce = int(1.0 / scale) if scale < 0.5 else 1  # box-average big images before sampling
    if reduce > 1:
        source = source.reduce(reduce)
        cx, cy, scale = cx / reduce, cy / reduce, scale * reduce
    span_x, span_y = out_w / scale, out_h / scale
    box = (cx - span_x / 2, cy - span_y / 2, cx + span_x / 2, cy + span_y / 2)
    return source.transform((out_w, out_h), Image.Transform.EXTENT, box, Image.Resampling.BILINEAR,
                            fillcolor=0)


def _despeckle(arr: np.ndarray) -> np.ndarray:
    """A 3x3 median filter (dust, salt-and-pepper noise, JPEG specks), kept only when it leaves the ink
    mostly intact: a 1-pixel pen line is erased by it, and then the unfiltered image is used."""
    filtered = np.asarray(Image.fromarray(np.rint(arr).astype(np.uint8), mode="L")
                          .filter(ImageFilter.MedianFilter(3)), dtype=np.float32)
    return filtered if filtered.sum() >= DESPECKLE_KEEP * arr.sum() else arr


def _border(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the outermost ring of pixels (every pixel when the image is under 3x3)."""
    if h < 3 or w < 3:
        grid = np.indices((h, w)).reshape(2, -1)
        return grid[0], grid[1]
    inner = np.arange(1, h - 1)
    ys = np.concatenate([np.zeros(w, int), np.full(w, h - 1), inner, inner])
    xs = np.concatenate([np.arange(w), np.arange(w), np.zeros(h - 2, int), np.full(h - 2, w - 1)])
    return ys, xs


def _background_plane(values: np.ndarray, ys: np.ndarray, xs: np.ndarray, h: int, w: int) -> np.ndarray:
    """Least-squares plane a + b*x + c*y through the border's darker 75% (ink touching the border is
    bright, so it is left out) → (H, W) background to subtract."""
    keep = values <= np.percentile(values, 75)
    design = np.stack([np.ones(int(keep.sum())), xs[keep], ys[keep]], axis=1).astype(np.float64)
    coef = np.linalg.lstsq(design, values[keep].astype(np.float64), rcond=None)[0]
    plane = coef[0] + coef[1] * np.arange(w)[None, :] + coef[2] * np.arange(h)[:, None]
    return plane.astype(np.float32)


def _ink_neighbours(mask: np.ndarray) -> np.ndarray:
    """For each pixel, how many of its 8 neighbours are in ``mask``."""
    padded = np.pad(mask.astype(np.int16), 1)
    h, w = mask.shape
    counts = np.zeros((h, w), np.int16)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if (dy, dx) != (0, 0):
                counts += padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
    return counts


def _mass_extent(profile: np.ndarray, total: float) -> float:
    """Length in pixels of the span holding all but INK_TAIL of ``profile``'s mass at each end (≥ 1)."""
    cumulative = np.cumsum(profile) / total
    first = int(np.searchsorted(cumulative, INK_TAIL, side="right"))
    last = int(np.searchsorted(cumulative, 1.0 - INK_TAIL, side="left"))
    return float(max(1, last - first + 1))


class _Reader(io.BytesIO):
    """Encoded bytes for Pillow that call ``check`` before each read, so a long decode can be stopped
    between compressed blocks (Pillow's decoders pull their input through ``read``)."""

    check: Callable[[], None] | None = None

    def read(self, size: int | None = -1) -> bytes:
        if self.check is not None:
            self.check()
        return super().read(size)


# Compressed bytes handed to a decoder per call while a stop check is armed: deflate expands at most
# ~1000:1, so one call decodes at most a few MB of pixels (milliseconds) before the next check.
_CHECKED_BLOCK = 4096


def image_pixels(data: bytes, limits: ImageLimits = ImageLimits(), where: str = "image") -> int:
    """Decoded width*height of encoded image bytes, read from the header only (tens of µs): the cost
    the server admits a decode by. Raises InvalidInputError for bytes that are not an accepted image."""
    img = open_image(data, limits, where)
    w, h = img.size
    return w * h


def open_image(data: bytes, limits: ImageLimits, where: str) -> Image.Image:
    """Open encoded bytes lazily and apply the size guards from the header; no pixel is decoded yet."""
    size = len(data)
    if size == 0:
        raise InvalidInputError(f"{where}: expected encoded image bytes (PNG, JPEG), got 0 bytes")
    if size > limits.max_encoded_bytes:
        raise InvalidInputError(
            f"{where}: encoded image is {size} bytes, over the limit of {limits.max_encoded_bytes} bytes"
        )
    try:
        img = Image.open(_Reader(data), formats=list(limits.formats))  # reads the header only
        w, h = img.size
        if w * h > limits.max_pixels:  # the decompression-bomb guard, before any pixel is decoded
            raise InvalidInputError(
                f"{where}: image is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels} pixels"
            )
        if w < 1 or h < 1:
            raise InvalidInputError(f"{where}: image has an empty size {w}x{h}")
    except InvalidInputError:
        raise
    except UnidentifiedImageError:
        raise InvalidInputError(_unidentified(data, limits, where)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidInputError(
            f"{where}: image bytes are corrupt or truncated ({size} bytes): {exc}"
        ) from None
    return img


def decode_image(
    data: bytes,
    cfg: ModelConfig,
    limits: ImageLimits = ImageLimits(),
    where: str = "image",
    check: Callable[[], None] | None = None,
    opened: Image.Image | None = None,
) -> np.ndarray:
    """Decode encoded image bytes and preprocess them → (C, H, W) float32.

    ``check`` is called between the expensive steps (header, pixel decode, resize) and may raise to stop
    work that nobody waits for any more (deadline passed, client gone). ``opened`` is ``open_image``'s
    result for these bytes when the caller already read the header (to admit the decode by its cost).
    Raises InvalidInputError naming ``where``, what was expected and what arrived.
    """
    img = opened if opened is not None else open_image(data, limits, where)
    size = len(data)
    try:
        if check is not None:
            check()
            reader = getattr(img, "fp", None)  # an ImageFile's source; PIL types it on ImageFile only
            if isinstance(reader, _Reader):
                reader.check = check
                img.decodermaxblock = _CHECKED_BLOCK  # type: ignore[attr-defined]
        img.load()
        img = ImageOps.exif_transpose(img) if "exif" in img.info else img
    except InvalidInputError:
        raise
    except UnidentifiedImageError:
        raise InvalidInputError(_unidentified(data, limits, where)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidInputError(
            f"{where}: image bytes are corrupt or truncated ({size} bytes): {exc}"
        ) from None
    if check is not None:
        check()
    return image_to_array(img, cfg)


# Leading bytes of the formats we may accept: to tell "corrupt PNG" from "not an image at all".
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _sniff(data: bytes) -> str | None:
    for magic, fmt in _SIGNATURES:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _unidentified(data: bytes, limits: ImageLimits, where: str) -> str:
    """Why Pillow could not open the bytes, in the client's terms."""
    fmt = _sniff(data)
    allowed = ", ".join(limits.formats)
    if fmt is not None and fmt not in limits.formats:
        return (
            f"{where}: expected an image in one of {allowed}, "
            f"got a {fmt} image, which this server does not accept"
        )
    if fmt is not None:
        return (
            f"{where}: image bytes are corrupt or truncated ({len(data)} bytes that start like a {fmt} file)"
        )
    return f"{where}: expected an image in one of {allowed}, got {len(data)} bytes that do not decode as one"


_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "float64": np.dtype("<f8"),
    "uint8": np.dtype("u1"),
}


def tensor_to_array(
    data: bytes, dtype: str, shape: tuple[int, ...] | list[int], cfg: ModelConfig, where: str = "tensor"
) -> np.ndarray:
    """Validate a raw tensor against the model's input spec → (N, C, H, W) float32.

    Accepts (C, H, W) or (N, C, H, W). Float tensors are the model's input as they are (float32 is
    wrapped without a copy); uint8 tensors are pixels in the model's layout, scaled and normalized
    exactly like decoded images.
    """
    expected = tuple(map(int, cfg.input.shape))
    if dtype not in _DTYPES:
        raise InvalidInputError(f"{where}: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    shape = tuple(map(int, shape))
    if shape == expected:
        shape = (1, *shape)
    if len(shape) != 4 or shape[1:] != expected or shape[0] < 1:
        raise InvalidInputError(
            f"{where}: expected shape {list(expected)} or [N, {', '.join(map(str, expected))}], "
            f"got {list(shape)}"
        )
    np_dtype = _DTYPES[dtype]
    want = math.prod(shape) * np_dtype.itemsize  # math.prod: a few µs less than np.prod per request
    if len(data) != want:
        raise InvalidInputError(
            f"{where}: shape {list(shape)} of {dtype} needs {want} bytes, got {len(data)}"
        )
    arr = np.frombuffer(data, dtype=np_dtype).reshape(shape)
    if dtype == "uint8":
        return normalize_pixels(arr, cfg)
    if dtype != "float32":
        arr = arr.astype(np.float32)
    # One float32 reduction catches any NaN/Inf (they propagate into the sum); only a suspicious sum pays
    # for the exact element-wise check, which also clears finite values whose sum merely overflowed.
    # (A float64 sum converts first: measured ~16 µs per LeNet request against ~3 µs.)
    if not math.isfinite(arr.sum()) and not np.isfinite(arr).all():
        raise InvalidInputError(f"{where}: tensor holds NaN or Inf values; expected finite numbers")
    return arr


def normalize_pixels(pixels: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """(N, C, H, W) uint8 pixels → the model's normalized float32 input (÷255, then (x-mean)/std)."""
    pre = cfg.preprocessing
    mean = np.asarray(pre.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(pre.std, dtype=np.float32)[None, :, None, None]
    return np.ascontiguousarray(
        (pixels.astype(np.float32) / np.float32(255.0) - mean) / std, dtype=np.float32
    )


def stack(parts: list[np.ndarray]) -> np.ndarray:
    """Join decoded images (C, H, W) and tensors (N, C, H, W) into one (N, C, H, W) batch.

    A single tensor is returned as it is, so a raw float32 request reaches the model without a copy.
    """
    if len(parts) == 1:
        part = parts[0]
        return part if part.ndim == 4 else part[None]
    if all(p.ndim == 3 for p in parts):
        return np.stack(parts)
    return np.concatenate([p if p.ndim == 4 else p[None] for p in parts])
