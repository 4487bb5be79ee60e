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
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidInputError
from .model_config import ModelConfig

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


def image_to_array(img: Image.Image, cfg: ModelConfig) -> np.ndarray:
    """Convert, resize and normalize one Pillow image → (C, H, W) float32."""
    pre = cfg.preprocessing
    img = _to_mode(img, pre.color_mode)
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
            if isinstance(img.fp, _Reader):
                img.fp.check = check
                img.decodermaxblock = _CHECKED_BLOCK
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


_DTYPES = {
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
    expected = tuple(int(d) for d in cfg.input.shape)
    if dtype not in _DTYPES:
        raise InvalidInputError(f"{where}: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    shape = tuple(int(d) for d in shape)
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
    if np_dtype == np.uint8:
        return normalize_pixels(arr, cfg)
    if np_dtype != np.float32:
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
