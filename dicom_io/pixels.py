"""Turn a DICOM image into the one array the model reads.

:func:`read_pixels` returns the first frame as a 2-D ``float32`` array in
``[0, 1]`` where brighter means denser (the MONOCHROME2 appearance), whatever
the encoding. The pipeline follows the grayscale display pipeline of
PS3.3 §C.11 (Figure C.11-1 / PS3.4 Annex N):

1. Modality LUT (PS3.3 §C.11.1): Modality LUT Sequence via
   :func:`pydicom.pixels.apply_modality_lut`, else Rescale Slope / Intercept
   (computed in float32, in place, to keep memory low on large images).
2. VOI LUT (PS3.3 §C.11.2): the first VOI LUT Sequence item, else the first
   Window Center / Width pair with its VOI LUT Function (LINEAR,
   LINEAR_EXACT, SIGMOID; §C.11.2.1.2-3), mapped straight to ``[0, 1]``.
   Without either, the *actual* minimum and maximum of the modality values
   are stretched to ``[0, 1]``.
3. MONOCHROME1 (PS3.3 §C.7.6.3.1.2: minimum value is white) is inverted.

Why min/max and not the Bits Stored range when no VOI is given: min/max is
invariant under every affine re-encoding of the same image (12- vs 16-bit
storage, rescale slope/intercept, MONOCHROME1 with inverted values), which
is what "the same image gives the same array" needs; the Bits Stored range
would make a 12-bit image stored in a 16-bit container look black. The cost
is that a single outlier pixel compresses the contrast.

Presentation LUT Shape is not applied: for the DX/CR IODs it is IDENTITY for
MONOCHROME2 and INVERSE for MONOCHROME1 (PS3.3 §C.8.11.6.1.2), which is the
inversion step 3 already does.

Decoding uses pydicom 3's decoders, trying the pylibjpeg plugins first, then
python-gdcm, then whatever other plugin pydicom finds. A decompression-bomb
cap (Rows x Columns x Number of Frames x Bits Allocated) is checked from the
header *before* anything is decoded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import Enum
from os import PathLike
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

__all__ = [
    "DEFAULT_MAX_PIXELS_BITS",
    "PixelErrorKind",
    "PixelReadError",
    "read_luminance_file",
    "read_pixels",
    "read_pixels_file",
]

log = logging.getLogger(__name__)

# 2**31 bits = 256 MiB of decoded pixel data: a 16-bit 8192 x 8192 frame fits
# twice over; a 30-frame 4096^2 16-bit cine does not.
DEFAULT_MAX_PIXELS_BITS = 2**31

# Plugins tried in order; "" lets pydicom try every remaining available plugin.
_PLUGIN_ORDER: tuple[str, ...] = ("pylibjpeg", "gdcm", "")

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


# Never turned into a PixelReadError: the process is being stopped, or a
# generator is being closed.
_NOT_OURS = (KeyboardInterrupt, SystemExit, GeneratorExit)


class PixelErrorKind(str, Enum):
    """Why pixel data cannot become a model input; the ``<kind>`` of ``undecodable:<kind>``."""

    NO_PIXEL_DATA = "no-pixel-data"
    """No Pixel Data (7FE0,0010) element (PS3.3 §C.7.6.3)."""
    INVALID_HEADER = "invalid-header"
    """An image attribute (Rows, Bits Allocated, rescale, LUT...) is missing or unparseable."""
    NOT_MONOCHROME = "not-monochrome"
    """Not MONOCHROME1/2 with one sample per pixel (PS3.3 §C.7.6.3.1.2)."""
    DECOMPRESSION_BOMB = "decompression-bomb"
    """Rows x Columns x Frames x Bits Allocated exceeds the cap."""
    MISSING_TRANSFER_SYNTAX = "missing-transfer-syntax"
    """Encapsulated pixel data without a Transfer Syntax UID to say how."""
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported-transfer-syntax"
    """No installed decoder handles the transfer syntax."""
    UNSUPPORTED_PIXEL_DATA = "unsupported-pixel-data"
    """Float or Double Float Pixel Data."""
    TRUNCATED = "truncated"
    """Less pixel data than the header announces."""
    DECODE_FAILED = "decode-failed"
    """Every decoder refused the data, or it decoded to nonsense."""
    DECODER_CRASHED = "decoder-crashed"
    """A decoder raised a non-``Exception`` (e.g. a Rust panic in pylibjpeg-rle)."""
    BLANK_IMAGE = "blank-image"
    """Every pixel has the same value."""
    OUT_OF_MEMORY = "out-of-memory"
    """Under the cap, but too large for this machine."""
    UNREADABLE = "unreadable"
    """The file is not readable DICOM."""

    def __str__(self) -> str:  # so f"{kind}" gives the code
        return self.value


class PixelReadError(Exception):
    """The pixel data of a dataset cannot be turned into a model input.

    ``kind`` (a :class:`PixelErrorKind`) is machine-readable and becomes part of
    a skip reason (``SkipReason.undecodable(kind)``). Messages never contain
    header values, only our words, sizes and exception type names.
    """

    def __init__(self, kind: PixelErrorKind | str, message: str = "") -> None:
        kind = PixelErrorKind(kind)
        super().__init__(f"{kind.value}: {message}" if message else kind.value)
        self.kind: PixelErrorKind = kind


def read_pixels_file(
    path: str | PathLike[str], *, max_pixels_bits: int = DEFAULT_MAX_PIXELS_BITS
) -> np.ndarray:
    """Read a DICOM file and return :func:`read_pixels` of it.

    Raises:
        PixelReadError: the file is not readable DICOM (``UNREADABLE``) or, as
            for :func:`read_pixels`, its pixels cannot become a model input.
    """
    try:
        ds = pydicom.dcmread(Path(path), force=True)
    except _NOT_OURS:
        raise
    except BaseException as exc:  # any parse failure is "this file cannot be read"
        raise PixelReadError(PixelErrorKind.UNREADABLE, type(exc).__name__) from exc
    return read_pixels(ds, max_pixels_bits=max_pixels_bits)


def read_luminance_file(
    path: str | PathLike[str], *, max_pixels_bits: int = DEFAULT_MAX_PIXELS_BITS
) -> np.ndarray:
    """Like :func:`read_pixels_file`, but a colour image becomes its luminance.

    For analysis, not for serving: the pipeline refuses colour images
    (:attr:`PixelErrorKind.NOT_MONOCHROME`) before the model sees them; this
    reader lets the not-a-chest guard be checked on them too (``pneumo model
    guard``, the model card, the notebook). pydicom's decoders hand YBR data
    over as RGB already (YBR_FULL and YBR_FULL_422 converted by pydicom, the
    JPEG 2000 colour transforms YBR_ICT and YBR_RCT undone by the decoder), a
    palette goes through its lookup table; then ITU-R BT.601 luma of the first
    frame, stretched to [0, 1].

    Raises:
        PixelReadError: as :func:`read_pixels_file`, for anything but colour.
    """
    try:
        return read_pixels_file(path, max_pixels_bits=max_pixels_bits)
    except PixelReadError as exc:
        if exc.kind is not PixelErrorKind.NOT_MONOCHROME:
            raise
    try:
        ds = pydicom.dcmread(Path(path), force=True)
        _check_size(ds, max_pixels_bits)
        arr = ds.pixel_array
        if _int(ds, "NumberOfFrames", 1) > 1:
            arr = arr[0]
        if str(ds.PhotometricInterpretation) == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
            arr = arr / max(float(arr.max()), 1.0) * 255
        out = np.asarray(arr, dtype=np.float32)
        if out.ndim == 3:
            out = out[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    except (PixelReadError, *_NOT_OURS):
        raise
    except BaseException as exc:  # any decoder failure: this colour image cannot be read
        raise PixelReadError(PixelErrorKind.DECODE_FAILED, type(exc).__name__) from exc
    if out.ndim != 2:
        raise PixelReadError(PixelErrorKind.DECODE_FAILED, f"decoded shape {out.shape}")
    return np.ascontiguousarray(np.clip(out / max(float(out.max()), 1.0), 0.0, 1.0))


def read_pixels(ds: Dataset, *, max_pixels_bits: int = DEFAULT_MAX_PIXELS_BITS) -> np.ndarray:
    """Return the first frame of ``ds`` as float32 2-D in [0, 1], brighter = denser.

    Never returns NaN. Decoders may raise anything, including ``BaseException``
    subclasses that are not ``Exception`` (pyo3's ``PanicException``); all of
    them become a :class:`PixelReadError`, except ``KeyboardInterrupt``,
    ``SystemExit`` and ``GeneratorExit``, which propagate.

    Raises:
        PixelReadError: ``ds`` is not a decodable single-channel image (and
            for nothing else); ``kind`` says why.
    """
    try:
        return _read(ds, max_pixels_bits)
    except (PixelReadError, *_NOT_OURS):
        raise
    except MemoryError as exc:  # under the cap but still too big for this machine
        raise PixelReadError(PixelErrorKind.OUT_OF_MEMORY) from exc
    except Exception as exc:  # e.g. a tampered header value that pydicom cannot parse
        raise PixelReadError(PixelErrorKind.INVALID_HEADER, type(exc).__name__) from exc
    except BaseException as exc:  # a decoder panic outside the per-plugin guard
        raise PixelReadError(PixelErrorKind.DECODER_CRASHED, type(exc).__name__) from exc


def _read(ds: Dataset, max_pixels_bits: int) -> np.ndarray:
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise PixelReadError(PixelErrorKind.UNSUPPORTED_PIXEL_DATA, "float pixel data")
        raise PixelReadError(PixelErrorKind.NO_PIXEL_DATA)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    samples = _int(ds, "SamplesPerPixel", 1)
    if photometric not in _MONOCHROME or samples != 1:
        raise PixelReadError(
            PixelErrorKind.NOT_MONOCHROME,
            "Photometric Interpretation is not MONOCHROME1/2 with one sample",
        )
    _check_size(ds, max_pixels_bits)
    ds = _with_transfer_syntax(ds)
    stored = _decode_first_frame(ds)
    if stored.ndim != 2:
        raise PixelReadError(PixelErrorKind.DECODE_FAILED, f"decoded shape {stored.shape}")

    values = _modality_values(stored, ds)
    out = _apply_voi(values, ds)
    if out is None:
        out = _stretch(values)
    if photometric == "MONOCHROME1":
        np.subtract(1.0, out, out=out)
    np.clip(out, 0.0, 1.0, out=out)
    return np.ascontiguousarray(out, dtype=np.float32)


def _modality_values(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT / Rescale (PS3.3 §C.11.1) as a fresh float32 array we may modify in place.

    float32 (24-bit mantissa) represents every 16-bit stored value exactly and
    halves the memory of a float64 pipeline on large radiographs.
    """
    if "ModalityLUTSequence" in ds:
        try:
            return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
        except Exception as exc:  # a malformed Modality LUT Sequence
            raise PixelReadError(
                PixelErrorKind.INVALID_HEADER, f"modality LUT: {type(exc).__name__}"
            ) from exc
    slope = _required_float(ds, "RescaleSlope")
    intercept = _required_float(ds, "RescaleIntercept")
    values = stored.astype(np.float32)  # always a copy
    if slope is not None and slope != 1.0:
        if slope == 0.0:
            raise PixelReadError(PixelErrorKind.INVALID_HEADER, "Rescale Slope is 0")
        values *= np.float32(slope)
    if intercept:
        values += np.float32(intercept)
    return values


# --------------------------------------------------------------------------
# Header checks
# --------------------------------------------------------------------------


def _int(ds: Dataset, keyword: str, default: int) -> int:
    value = ds.get(keyword, None)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise PixelReadError(PixelErrorKind.INVALID_HEADER, f"{keyword} is not an integer") from exc


def _check_size(ds: Dataset, max_pixels_bits: int) -> None:
    """Refuse decompression bombs from the header alone, before decoding."""
    rows = _int(ds, "Rows", 0)
    cols = _int(ds, "Columns", 0)
    frames = max(_int(ds, "NumberOfFrames", 1), 1)
    bits = _int(ds, "BitsAllocated", 0)
    if rows <= 0 or cols <= 0 or bits not in (1, 8, 16, 32, 64):
        raise PixelReadError(
            PixelErrorKind.INVALID_HEADER, "Rows, Columns or Bits Allocated missing or out of range"
        )
    total = rows * cols * frames * bits
    if total > max_pixels_bits:
        raise PixelReadError(
            PixelErrorKind.DECOMPRESSION_BOMB,
            f"decoded size would exceed the {max_pixels_bits}-bit cap",
        )


def _with_transfer_syntax(ds: Dataset) -> Dataset:
    """Make sure ``ds.file_meta`` names a transfer syntax pydicom can decode with.

    A file without file meta (or without (0002,0010)) but read successfully
    tells us its encoding through ``original_encoding``; that is enough for
    native (uncompressed) pixel data. Encapsulated data without a transfer
    syntax cannot be decoded: we would not know the codec.
    """
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return ds
    elem = ds["PixelData"]
    if elem.is_undefined_length:
        raise PixelReadError(PixelErrorKind.MISSING_TRANSFER_SYNTAX, "encapsulated pixel data")
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if little is None:
        raise PixelReadError(PixelErrorKind.MISSING_TRANSFER_SYNTAX)
    if implicit:
        inferred = ImplicitVRLittleEndian
    else:
        inferred = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    copy = Dataset(ds)  # shallow: do not alter the caller's dataset
    copy.file_meta = pydicom.dataset.FileMetaDataset(meta or {})
    copy.file_meta.TransferSyntaxUID = inferred
    copy.set_original_encoding(bool(implicit), bool(little))
    return copy


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------


def _decode_first_frame(ds: Dataset) -> np.ndarray:
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise PixelReadError(
            PixelErrorKind.UNSUPPORTED_TRANSFER_SYNTAX, "no decoder for this transfer syntax"
        ) from exc
    if not decoder.is_available:
        raise PixelReadError(
            PixelErrorKind.UNSUPPORTED_TRANSFER_SYNTAX, "no decoder plugin installed"
        )

    errors: list[str] = []
    crashed = False
    plugins: Sequence[str] = (
        [p for p in _PLUGIN_ORDER if p == "" or p in decoder.available_plugins]
        if decoder.is_encapsulated
        else [""]
    )
    for plugin in plugins:
        try:
            arr, _meta = decoder.as_array(ds, index=0, decoding_plugin=plugin, as_rgb=False)  # type: ignore[arg-type]  # pydicom types **kwargs as DecodeOptions
            return arr
        except _NOT_OURS:
            raise
        except MemoryError:
            raise
        except BaseException as exc:  # each plugin fails in its own way; try the next
            # pyo3 panics (pylibjpeg-rle on Rows/Columns that disagree with
            # the data) are BaseException, not Exception.
            crashed = crashed or not isinstance(exc, Exception)
            errors.append(f"{plugin or 'any'}:{type(exc).__name__}")
            # Exception types only: decoder messages may quote header values.
            log.debug(
                "decoding %s with plugin %r failed: %s",
                ts.name,
                plugin or "any",
                type(exc).__name__,
            )
            text = str(exc).lower()
            if "less than expected" in text or "truncat" in text or "too short" in text:
                raise PixelReadError(PixelErrorKind.TRUNCATED, type(exc).__name__) from exc
            if not decoder.is_encapsulated:
                raise PixelReadError(PixelErrorKind.DECODE_FAILED, type(exc).__name__) from exc
    kind = PixelErrorKind.DECODER_CRASHED if crashed else PixelErrorKind.DECODE_FAILED
    raise PixelReadError(kind, ", ".join(errors))


# --------------------------------------------------------------------------
# VOI and scaling
# --------------------------------------------------------------------------


def _stretch(values: np.ndarray) -> np.ndarray:
    """Map [min, max] of ``values`` to [0, 1], in place."""
    lo = float(np.min(values))
    hi = float(np.max(values))
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise PixelReadError(PixelErrorKind.DECODE_FAILED, "non-finite pixel values")
    if hi <= lo:
        raise PixelReadError(PixelErrorKind.BLANK_IMAGE, "all pixels have the same value")
    values -= np.float32(lo)
    values /= np.float32(hi - lo)
    return values


def _required_float(ds: Dataset, keyword: str) -> float | None:
    """A numeric header value: None when absent or empty, PixelReadError when unparseable.

    Guessing a rescale would silently change every pixel, so garbage is refused.
    """
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    out = _first_float(value)
    if out is None:
        raise PixelReadError(PixelErrorKind.INVALID_HEADER, f"{keyword} is not a finite number")
    return out


def _first_float(value: object) -> float | None:
    """First value of a possibly multi-valued DS element, or None."""
    if value is None or value == "":
        return None
    if not isinstance(value, (str, bytes)) and hasattr(value, "__getitem__"):
        try:
            value = value[0]
        except (IndexError, TypeError):
            return None
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _apply_voi(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Apply the first VOI LUT or window, returning [0, 1], or None if there is none usable.

    Windows are applied in place on ``values`` (float32, owned by the caller).
    """
    seq = ds.get("VOILUTSequence")
    if seq:
        out = _apply_voi_lut_item(values, seq[0])
        if out is not None:
            return out
    center = _first_float(ds.get("WindowCenter"))
    width = _first_float(ds.get("WindowWidth"))
    if center is None or width is None:
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function == "SIGMOID":
        # PS3.3 §C.11.2.1.3.1, with output range [0, 1].
        if width <= 0:
            return None
        values -= np.float32(center)
        values *= np.float32(-4.0 / width)
        np.exp(values, out=values)
        values += np.float32(1.0)
        np.reciprocal(values, out=values)
        return values
    if function == "LINEAR_EXACT":
        # PS3.3 §C.11.2.1.3.2.
        if width <= 0:
            return None
        values -= np.float32(center)
        values /= np.float32(width)
        values += np.float32(0.5)
        return np.clip(values, 0.0, 1.0, out=values)
    # LINEAR, PS3.3 §C.11.2.1.2.1: width >= 1.
    if width < 1:
        return None
    if width == 1:
        return (values > center - 0.5).astype(np.float32)
    values -= np.float32(center - 0.5)
    values /= np.float32(width - 1)
    values += np.float32(0.5)
    return np.clip(values, 0.0, 1.0, out=values)


def _apply_voi_lut_item(values: np.ndarray, item: Dataset) -> np.ndarray | None:
    """Apply one VOI LUT Sequence item (PS3.3 §C.11.2.1.1), normalised by its output range."""
    try:
        n_entries, first_mapped, _bits = (int(v) for v in item.LUTDescriptor)
        data = item.LUTData
    except Exception:
        return None
    lut = np.asarray(
        data if not isinstance(data, (bytes, bytearray)) else np.frombuffer(data, dtype="<u2"),
        dtype=np.float64,
    ).ravel()
    if n_entries == 0:
        n_entries = 65536  # PS3.3 §C.11.1.1.1: 0 means 2^16 entries
    if lut.size == 0:
        return None
    lut = lut[:n_entries]
    lo, hi = float(lut.min()), float(lut.max())
    if hi <= lo:
        return None
    # Values below/above the LUT take its first/last entry.
    idx = np.clip(np.rint(values - np.float32(first_mapped)), 0, lut.size - 1).astype(np.intp)
    # Normalise by the LUT's actual output range, not the declared bit depth:
    # LUTs declaring 16 bits but holding 12-bit values are common in the wild.
    out = lut.astype(np.float32)[idx]
    out -= np.float32(lo)
    out /= np.float32(hi - lo)
    return out
