"""PNG renderings for the browser: an archived instance through dicom_io's pixel reader,
and a heatmap Secondary Capture as stored."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from dicom_io.pixels import read_pixels_file

__all__ = ["heatmap_png", "instance_png"]

MAX_SIDE = 1024  # the page shows two images side by side; more pixels only cost time


def _png(image: Image.Image) -> bytes:
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE))
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False, compress_level=3)
    return out.getvalue()


def instance_png(path: str | Path, *, max_pixels_bits: int) -> bytes:
    """The instance as the model saw it (display pipeline of PS3.3 §C.11), 8-bit grey.

    Raises:
        dicom_io.pixels.PixelReadError: the pixels cannot be read.
    """
    pixels = read_pixels_file(path, max_pixels_bits=max_pixels_bits)
    return _png(Image.fromarray(np.round(pixels * 255.0).astype(np.uint8), mode="L"))


def heatmap_png(path: str | Path) -> bytes:
    """The heatmap Secondary Capture (RGB, uncompressed) as a PNG.

    Raises:
        OSError, ValueError: the file is missing or not the SC pneumo writes.
    """
    ds = pydicom.dcmread(Path(path))
    array = ds.pixel_array
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError("not an RGB secondary capture")
    return _png(Image.fromarray(array.astype(np.uint8), mode="RGB"))
