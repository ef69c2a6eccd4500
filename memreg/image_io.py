"""Decode any image a dataset may hold into 8-bit RGB, the one way every part of memreg reads images.

``Image.convert("RGB")`` is wrong for several modes a real dataset contains, so every reader (the
trainer, the audit, the monitor's duplicate index, the attack) calls :func:`load_rgb` instead:

* **EXIF orientation** is applied first (``ImageOps.exif_transpose``): a phone photo stored rotated
  is seen upright, as every viewer shows it.
* **16- and 32-bit integer** modes (``I;16``, ``I;16B``, ``I;16L``, ``I``): Pillow's ``convert`` clips
  values above 255, so a 16-bit PNG comes out almost white. Here the full 16-bit range maps onto
  0..255 (``v * 255 / 65535``, rounded); a mode ``I`` image with values outside 0..65535 is refused.
* **float** (``F``): values in [0, 1] are taken as intensities in [0, 1], values in [0, 255] as
  8-bit intensities; anything else, or a non-finite value, is refused.
* **transparency** (``RGBA``, ``LA``, ``PA``, ``P`` with a transparency entry): composited onto
  white (kohya's and most viewers' convention), so hidden pixels under alpha 0 never reach training.
* ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``1``, ``L``, ``P``: Pillow's own conversion.

Errors are :class:`ImageDecodeError` naming the file and the cause.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from memreg.errors import MemregError

_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageDecodeError(MemregError, ValueError):
    """An image that cannot be decoded into RGB; the message names the file and the cause."""


def _describe(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return getattr(source, "filename", None) or "<in-memory image>"


def _gray_to_rgb(gray8: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(gray8[..., None], 3, axis=2), mode="RGB")


def _from_int(image: Image.Image, name: str) -> Image.Image:
    arr = np.asarray(image)
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise ImageDecodeError(f"image {name}: mode {image.mode} values span {arr.min()}..{arr.max()}, "
                               "outside the 16-bit range 0..65535")
    return _gray_to_rgb(np.rint(arr * (255.0 / 65535.0)).astype(np.uint8))


def _from_float(image: Image.Image, name: str) -> Image.Image:
    arr = np.asarray(image, dtype=np.float64)
    if arr.size and not np.isfinite(arr).all():
        raise ImageDecodeError(f"image {name}: mode F holds non-finite values")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0:
        scale = 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scale = 1.0
    else:
        raise ImageDecodeError(f"image {name}: mode F values span {lo:g}..{hi:g}; expected [0, 1] or [0, 255]")
    return _gray_to_rgb(np.rint(arr * scale).astype(np.uint8))


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image, name: str | None = None) -> Image.Image:
    """An already opened ``PIL.Image`` as 8-bit RGB by the rules of this module (EXIF orientation too)."""
    name = name or _describe(image)
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _INT_MODES:
        return _from_int(image, name)
    if mode == "F":
        return _from_float(image, name)
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        return _composite_on_white(image)
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageDecodeError(f"image {name}: cannot convert mode {mode} to RGB ({e})") from None


def open_image(source: Any) -> Image.Image:
    """Open a path, raw bytes or ``PIL.Image`` (not yet decoded into RGB)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(source)))
    return Image.open(source)


def load_rgb(source: Any) -> Image.Image:
    """Decode a path, raw bytes, ``PIL.Image`` or HxW(xC) uint8 array into an 8-bit RGB ``PIL.Image``."""
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8:
            raise ImageDecodeError(f"array image of dtype {source.dtype}; expected uint8")
        return to_rgb(Image.fromarray(source), "<array>")
    name = _describe(source)
    if isinstance(source, Image.Image):
        return to_rgb(source, name)
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise ImageDecodeError(f"image file {name!r} does not exist")
    try:
        with open_image(source) as im:
            im.load()
            out = to_rgb(im, name)
            return out.copy() if out is im else out
    except ImageDecodeError:
        raise
    except (OSError, ValueError, SyntaxError) as e:  # PIL's decoders raise these for bad files
        raise ImageDecodeError(f"image {name!r} cannot be decoded ({type(e).__name__}: {e})") from None
