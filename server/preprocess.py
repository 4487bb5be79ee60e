"""Image bytes or raw tensors → validated float32 NCHW arrays (pure functions, no I/O).

Training, evaluation and serving all call ``image_to_array`` so that a model sees exactly the
same pixels offline and online.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidInputError
from .model_config import ModelConfig

DEFAULT_MAX_PIXELS = 16_000_000
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


def decode_image(data: bytes, cfg: ModelConfig, limits: ImageLimits = ImageLimits(), where: str = "image") -> np.ndarray:
    """Decode encoded image bytes and preprocess them → (C, H, W) float32.

    Raises InvalidInputError naming ``where``, what was expected and what arrived.
    """
    size = len(data)
    if size == 0:
        raise InvalidInputError(f"{where}: expected encoded image bytes (PNG, JPEG), got 0 bytes")
    if size > limits.max_encoded_bytes:
        raise InvalidInputError(
            f"{where}: encoded image is {size} bytes, over the limit of {limits.max_encoded_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(limits.formats))
            w, h = img.size
            if w * h > limits.max_pixels:
                raise InvalidInputError(
                    f"{where}: image is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels} pixels")
            if w < 1 or h < 1:
                raise InvalidInputError(f"{where}: image has an empty size {w}x{h}")
            img.load()
            img = ImageOps.exif_transpose(img) if "exif" in img.info else img
    except InvalidInputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInputError(
            f"{where}: expected an image in one of {', '.join(limits.formats)}, "
            f"got {size} bytes that do not decode as one ({type(exc).__name__})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidInputError(f"{where}: image bytes are corrupt or truncated ({size} bytes): {exc}") from None
    return image_to_array(img, cfg)


_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "float64": np.dtype("<f8"), "uint8": np.dtype("u1")}


def tensor_to_array(data: bytes, dtype: str, shape: tuple[int, ...], cfg: ModelConfig,
                    where: str = "tensor") -> np.ndarray:
    """Validate a raw tensor against the model's input spec → (N, C, H, W) float32.

    Accepts (C, H, W) or (N, C, H, W). float32 input is wrapped without a copy.
    """
    expected = tuple(int(d) for d in cfg.input.shape)
    if dtype not in _DTYPES:
        raise InvalidInputError(f"{where}: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    shape = tuple(int(d) for d in shape)
    if shape == expected:
        shape = (1, *shape)
    if len(shape) != 4 or shape[1:] != expected or shape[0] < 1:
        raise InvalidInputError(
            f"{where}: expected shape {list(expected)} or [N, {', '.join(map(str, expected))}], got {list(shape)}")
    np_dtype = _DTYPES[dtype]
    want = int(np.prod(shape)) * np_dtype.itemsize
    if len(data) != want:
        raise InvalidInputError(
            f"{where}: shape {list(shape)} of {dtype} needs {want} bytes, got {len(data)}")
    arr = np.frombuffer(data, dtype=np_dtype).reshape(shape)
    if np_dtype != np.float32:
        arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"{where}: tensor holds NaN or Inf values; expected finite numbers")
    return arr
