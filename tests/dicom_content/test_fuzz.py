"""Property-based fuzzing of the header -> selection -> pixel path (issue 8, hostile input).

Generated data sets carry tampered header values (as read from a file, i.e. raw
elements), random pixel bytes in native and RLE encodings, and Rows/Columns that
disagree with the data. Whatever comes in, the path ends in a selection reason,
a PixelReadError with a PixelErrorKind, or an array in [0, 1]: nothing else escapes.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from dicom_io.pixels import PixelErrorKind, PixelReadError, read_pixels
from dicom_io.sanitize import sanitize_header
from dicom_io.selection import SkipReason, select_instance

_TEXT = st.binary(max_size=24)  # any bytes, NUL and non-ASCII included


def _mostly(likely: list[bytes], other: list[bytes]) -> st.SearchStrategy[bytes]:
    """Values that pass selection most of the time, so the pixel path is exercised too."""
    return st.sampled_from(likely * 4 + other)


_MODALITY = _mostly([b"DX", b"CR"], [b"CT", b"", b"D\x00X", b"OT"])
_BODY_PART = _mostly([b"CHEST", b""], [b"HAND", b"CHEST\x00"])
_VIEW = _mostly([b"PA", b"AP", b""], [b"LL", b"XX", b"\xff\xfe"])


def _raw(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def _us(value: int) -> bytes:
    return int(value).to_bytes(2, "little")


@st.composite
def datasets(draw: st.DrawFn) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    encoding = draw(st.sampled_from(["native", "rle", "none"]))
    ds.file_meta.TransferSyntaxUID = RLELossless if encoding == "rle" else ExplicitVRLittleEndian
    ds.set_original_encoding(False, True)
    _raw(ds, 0x00080016, "UI", b"1.2.840.10008.5.1.4.1.1.1\x00")
    _raw(ds, 0x00080018, "UI", b"1.2.3.4\x00")
    _raw(ds, 0x00080020, "DA", draw(st.one_of(_TEXT, st.just(b"19800231"))))
    _raw(ds, 0x00080030, "TM", draw(_TEXT))
    _raw(ds, 0x00080060, "CS", draw(_MODALITY))
    _raw(ds, 0x00100020, "LO", draw(_TEXT))
    _raw(ds, 0x00100030, "DA", draw(_TEXT))
    _raw(ds, 0x00180015, "CS", draw(_BODY_PART))
    _raw(ds, 0x00185101, "CS", draw(_VIEW))
    _raw(ds, 0x00280002, "US", _us(draw(st.sampled_from([1] * 8 + [3, 0]))))
    photometric = _mostly([b"MONOCHROME2", b"MONOCHROME1"], [b"RGB ", b""])
    _raw(ds, 0x00280004, "CS", draw(photometric))
    _raw(ds, 0x00280008, "IS", draw(_mostly([b"1 ", b""], [b"2 ", b"x "])))
    rows, cols = draw(st.integers(0, 40)), draw(st.integers(1, 40))
    bits = draw(st.sampled_from([8, 16, 8, 16, 1, 12, 0]))
    _raw(ds, 0x00280010, "US", _us(rows))
    _raw(ds, 0x00280011, "US", _us(cols))
    _raw(ds, 0x00280100, "US", _us(bits))
    _raw(ds, 0x00280101, "US", _us(min(bits, 16)))
    _raw(ds, 0x00280103, "US", _us(draw(st.sampled_from([0, 1]))))
    _raw(ds, 0x00281050, "DS", draw(st.sampled_from([b"", b"40 ", b"nan ", b"1e400", b"abc "])))
    _raw(ds, 0x00281051, "DS", draw(st.sampled_from([b"", b"400 ", b"0 ", b"-5 "])))
    _raw(ds, 0x00281053, "DS", draw(st.sampled_from([b"", b"1 ", b"0 ", b"2.5 "])))
    if encoding != "none":
        exact = rows * cols * max(bits, 8) // 8  # the size the header announces, often
        size = draw(st.one_of(st.just(exact), st.integers(2, 5000)))
        pixels = draw(st.binary(min_size=max(size, 2), max_size=max(size, 2)))
        if encoding == "rle":
            pixels = encapsulate([pixels])
        elif len(pixels) % 2:
            pixels += b"\x00"
        ds.PixelData = pixels
        if encoding == "rle":
            ds["PixelData"].is_undefined_length = True
            ds["PixelData"].VR = "OB"
    return ds


@pytest.mark.slow
# Issue 8 asks for 5 000 generated data sets in CI: ~15 s on 2 shared cores.
# PNEUMO_FUZZ_EXAMPLES=400 shortens a local run.
@settings(
    max_examples=int(os.environ.get("PNEUMO_FUZZ_EXAMPLES", "5000")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ds=datasets())
def test_hostile_headers_and_pixels_never_escape(ds: Dataset) -> None:
    fixes = sanitize_header(ds)
    assert all(":" in f.code for f in fixes)
    selection = select_instance(ds)
    assert selection.selected == (selection.reason is None)
    if not selection.selected:
        return
    try:
        image = read_pixels(ds)
    except PixelReadError as exc:
        assert isinstance(exc.kind, PixelErrorKind)
        assert SkipReason.undecodable(exc.kind).startswith("undecodable:")
        return
    assert image.ndim == 2 and image.dtype == np.float32
    assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
