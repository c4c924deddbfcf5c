"""The one loader of non-DICOM images (JPEG, PNG, ...).

DICOM pixels are read by ``dicom_io.pixels.read_pixels``; both paths yield the
same thing: a 2-D float32 array in [0, 1], 0 = black.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_SUFFIXES", "ImageLoadError", "image_to_float", "load_image_file"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"})
"""File suffixes :func:`load_image_file` is used for (training and evaluation alike)."""


class ImageLoadError(ValueError):
    """A file could not be decoded as an image."""


def image_to_float(img: Image.Image) -> np.ndarray:
    """Convert a PIL image to a 2-D float32 [0, 1] grayscale array.

    Colour and alpha images are converted to luminance ("L", ITU-R 601-2) after
    compositing onto black, 16-bit integer images are scaled by their bit range.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        peak = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        result: np.ndarray = np.clip(arr / peak, 0.0, 1.0).astype(np.float32)
        return result
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        return ((arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)).astype(np.float32)
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.float32) / 255.0


def load_image_file(path: str | Path) -> np.ndarray:
    """Decode a JPEG/PNG/... file to a 2-D float32 array in [0, 1].

    Raises :class:`ImageLoadError` when the file is not a decodable image.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return image_to_float(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageLoadError(f"cannot decode image {Path(path).name}: {exc}") from exc
