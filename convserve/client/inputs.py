"""Path / bytes / PIL image / numpy array → the proto ``Image`` the server decodes.

What each input kind becomes on the wire:

=============================  ===================================================================
path (``str`` or ``Path``)     the file's bytes as they are (PNG, JPEG, ...); nothing decoded here
``bytes``-like                 sent as they are: already-encoded image bytes
PIL image                      encoded as PNG with Pillow (the caller has Pillow, it made the image)
numpy ``uint8`` (H, W)         encoded as a lossless PNG here with zlib, so the server preprocesses it
or (H, W, C), C in 1/3/4       exactly like a file; no Pillow needed on the client
numpy float (C, H, W)          a raw tensor, already preprocessed into the model's input layout
or (N, C, H, W)                (float16/32/64, sent little-endian); the server only validates it
=============================  ===================================================================

The dtype decides: ``uint8`` arrays are pixels, floating arrays are model-input tensors. A raw
``uint8`` tensor is never sent, because the server would skip the scaling and normalisation.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from convserve.protos.convserve.v1 import classifier_pb2 as pb

from .errors import InvalidInputError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    ImageInput = str | os.PathLike[str] | bytes | bytearray | memoryview | np.ndarray | PILImage | pb.Image
else:
    ImageInput = Any

_TENSOR_DTYPES = {
    np.dtype(np.float32): pb.DATA_TYPE_FLOAT32,
    np.dtype(np.float16): pb.DATA_TYPE_FLOAT16,
    np.dtype(np.float64): pb.DATA_TYPE_FLOAT64,
}
# PNG colour types by channel count: grey, grey+alpha, RGB, RGBA.
_PNG_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}
# Modes PNG cannot hold; converted to RGB before encoding.
_NON_PNG_MODES = frozenset({"CMYK", "YCbCr", "LAB", "HSV"})


def to_image(obj: ImageInput, where: str = "image") -> pb.Image:
    """One image of any supported kind → a proto ``Image``.

    Raises ``InvalidInputError`` for unreadable files, unsupported types and array shapes that
    are not one image (use ``to_images`` for an (N, C, H, W) batch).
    """
    images = _convert(obj, where)
    if len(images) != 1:
        raise InvalidInputError(
            f"{where}: expected one image, got an array holding {len(images)}; use classify_batch()")
    return images[0]


def to_images(objs: Iterable[ImageInput] | np.ndarray) -> list[pb.Image]:
    """Many images → proto ``Image``s; a 4-D array counts as N images (N, C, H, W) or (N, H, W, C)."""
    if isinstance(objs, np.ndarray):
        return _convert(objs, "images")
    if isinstance(objs, str | bytes | os.PathLike) or _is_pil_image(objs):
        raise InvalidInputError("images: expected a sequence of images, got a single image; use classify()")
    out: list[pb.Image] = []
    for i, obj in enumerate(objs):
        out.extend(_convert(obj, f"images[{i}]"))
    return out


def _convert(obj: Any, where: str) -> list[pb.Image]:
    if isinstance(obj, pb.Image):
        return [obj]
    if isinstance(obj, bytes | bytearray | memoryview):
        return [pb.Image(encoded=bytes(obj))]
    if isinstance(obj, str | os.PathLike):
        return [pb.Image(encoded=_read_file(obj, where))]
    if isinstance(obj, np.ndarray):
        return _from_array(obj, where)
    if _is_pil_image(obj):
        return [pb.Image(encoded=_encode_pil(obj, where))]
    raise InvalidInputError(
        f"{where}: expected a path, encoded bytes, a PIL image or a numpy array, got {type(obj).__name__}")


def _read_file(path: str | os.PathLike[str], where: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise InvalidInputError(f"{where}: cannot read image file {os.fspath(path)!r}: {reason}") from None


def _from_array(arr: np.ndarray, where: str) -> list[pb.Image]:
    if arr.dtype == np.uint8:
        if arr.ndim == 4:  # (N, H, W, C) pixels
            return [pb.Image(encoded=encode_png(a, f"{where}[{i}]")) for i, a in enumerate(arr)]
        return [pb.Image(encoded=encode_png(arr, where))]
    code = _TENSOR_DTYPES.get(arr.dtype.newbyteorder("="))
    if code is None:
        raise InvalidInputError(
            f"{where}: array dtype must be uint8 (pixels) or float16/32/64 (model input), got {arr.dtype}")
    if arr.ndim == 3:
        return [_tensor(arr, code)]
    if arr.ndim == 4:
        return [_tensor(a, code) for a in arr]  # one Image per sample: one result each
    raise InvalidInputError(
        f"{where}: float arrays are model-input tensors shaped (C, H, W) or (N, C, H, W), "
        f"got shape {list(arr.shape)}")


def _tensor(chw: np.ndarray, code: pb.DataType) -> pb.Image:
    little = chw.astype(chw.dtype.newbyteorder("<"), copy=False)
    return pb.Image(tensor=pb.Tensor(dtype=code, shape=chw.shape, data=little.tobytes()))


def encode_png(pixels: np.ndarray, where: str = "image") -> bytes:
    """uint8 (H, W) or (H, W, C) with C in 1..4 → lossless 8-bit PNG bytes, using only zlib.

    PNG rather than a raw uint8 tensor so the server converts, resizes and normalises it exactly
    as it would a file.
    """
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise InvalidInputError(
            f"{where}: pixel arrays must be uint8 shaped (H, W) or (H, W, C), "
            f"got {pixels.dtype} {list(pixels.shape)}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    height, width, channels = pixels.shape
    if channels not in _PNG_COLOR_TYPE or height < 1 or width < 1:
        raise InvalidInputError(
            f"{where}: pixel arrays need 1, 2, 3 or 4 channels last and a non-empty size, "
            f"got shape {list(pixels.shape)}")
    rows = np.zeros((height, 1 + width * channels), dtype=np.uint8)  # filter byte 0 ("none") per row
    rows[:, 1:] = pixels.reshape(height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOR_TYPE[channels], 0, 0, 0)
    return b"".join((
        b"\x89PNG\r\n\x1a\n",
        _png_chunk(b"IHDR", header),
        _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)),  # level 1: small images, speed over size
        _png_chunk(b"IEND", b""),
    ))


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _is_pil_image(obj: object) -> bool:
    # Only an imported Pillow can have made a PIL image, so Pillow is never imported here.
    module = sys.modules.get("PIL.Image")
    return module is not None and isinstance(obj, module.Image)


def _encode_pil(img: PILImage, where: str) -> bytes:
    if img.mode in _NON_PNG_MODES:
        img = img.convert("RGB")
    buffer = io.BytesIO()
    try:
        img.save(buffer, format="PNG")
    except (OSError, KeyError, ValueError) as exc:
        raise InvalidInputError(
            f"{where}: cannot encode PIL image of mode {img.mode!r} as PNG: {exc}") from None
    return buffer.getvalue()

