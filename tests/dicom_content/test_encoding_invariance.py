"""Encoding invariance: the same image, however it is encoded, reads to the same array.

Real chest X-rays from ``../shared/data/dicom/cxr`` (RG1: 15-bit MONOCHROME1 CR
with a window; the NIH/Udacity DX: 8-bit MONOCHROME2 without one) are
re-encoded with pydicom (MONOCHROME1 <-> MONOCHROME2 with inverted stored
values, 12- vs 16-bit storage, rescale slope/intercept with inversely
transformed stored values) and then with DCMTK (RLE, JPEG-LS lossless,
JPEG lossless process 14, big endian, deflated) and pydicom/openjpeg
(JPEG 2000 lossless). Every result must agree with the plain encoding within
1/255. Images are downscaled first (by sub-sampling, which keeps the stored
values) so the whole module runs in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from dicom_io.pixels import read_pixels, read_pixels_file
from tests.paths import DICOM_DATA

CXR = DICOM_DATA / "cxr"

TOLERANCE = 1.0 / 255.0

# name -> (file, sub-sampling step, keep the window?)
BASES: dict[str, tuple[str, int, bool]] = {
    "rg1-mono1-window": ("RG1_UNCR.dcm", 4, True),
    "rg1-mono1-nowindow": ("RG1_UNCR.dcm", 4, False),
    "nih-dx-8bit": ("udacity_aihcnd_test1.dcm", 2, False),
}


def _set_pixels(ds: Dataset, stored: np.ndarray, *, bits_stored: int, signed: bool = False) -> None:
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16 if bits_stored > 8 else 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    dtype = {(8, False): "<u1", (16, False): "<u2", (16, True): "<i2"}[(ds.BitsAllocated, signed)]
    assert stored.min() >= np.iinfo(dtype).min and stored.max() <= np.iinfo(dtype).max
    ds.PixelData = stored.astype(dtype).tobytes()
    ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"


def _make_base(name: str) -> Dataset:
    filename, step, keep_window = BASES[name]
    src = CXR / filename
    if not src.is_file():
        pytest.skip(f"shared file {filename} not present")
    ds = pydicom.dcmread(src)
    stored = ds.pixel_array[::step, ::step].copy()
    bits = int(ds.BitsStored)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if not keep_window:
        for kw in ("WindowCenter", "WindowWidth", "VOILUTFunction", "WindowCenterWidthExplanation"):
            if kw in ds:
                delattr(ds, kw)
    _set_pixels(ds, stored, bits_stored=bits)
    return ds


def _stored(ds: Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.int64)


def _window(ds: Dataset) -> tuple[float, float] | None:
    if "WindowCenter" not in ds:
        return None
    c, w = ds.WindowCenter, ds.WindowWidth
    return float(c[0] if isinstance(c, pydicom.multival.MultiValue) else c), float(
        w[0] if isinstance(w, pydicom.multival.MultiValue) else w
    )


def v_identity(ds: Dataset) -> Dataset:
    return ds


def v_invert_photometric(ds: Dataset) -> Dataset:
    """MONOCHROME1 <-> MONOCHROME2 with stored values (and window) inverted."""
    top = 2 ** int(ds.BitsStored) - 1
    stored = top - _stored(ds)
    ds.PhotometricInterpretation = (
        "MONOCHROME2" if ds.PhotometricInterpretation == "MONOCHROME1" else "MONOCHROME1"
    )
    if (win := _window(ds)) is not None:
        ds.WindowCenter = top - win[0]
    if "PresentationLUTShape" in ds:
        ds.PresentationLUTShape = (
            "INVERSE" if ds.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY"
        )
    _set_pixels(ds, stored, bits_stored=int(ds.BitsStored))
    return ds


def _rebit(ds: Dataset, bits: int) -> Dataset:
    old = int(ds.BitsStored)
    stored = _stored(ds)
    stored = stored << (bits - old) if bits >= old else stored >> (old - bits)
    if (win := _window(ds)) is not None:
        factor = 2.0 ** (bits - old)
        ds.WindowCenter, ds.WindowWidth = win[0] * factor, win[1] * factor
    _set_pixels(ds, stored, bits_stored=bits)
    return ds


def v_16bit(ds: Dataset) -> Dataset:
    return _rebit(ds, 16)


def v_12bit(ds: Dataset) -> Dataset:
    return _rebit(ds, 12)


def v_rescale_signed(ds: Dataset) -> Dataset:
    """Signed stored values shifted down; Rescale Intercept restores them."""
    offset = 2 ** (int(ds.BitsStored) - 1)
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, offset, "US"
    _set_pixels(ds, _stored(ds) - offset, bits_stored=16, signed=True)
    return ds


def v_rescale_slope(ds: Dataset) -> Dataset:
    """Stored = (value - b) / m; Modality LUT gives value back (window stays in modality units)."""
    slope = 0.5 if int(ds.BitsStored) <= 14 else 2.0
    intercept = -1000.0
    stored = np.rint((_stored(ds) - intercept) / slope).astype(np.int64)
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    _set_pixels(ds, stored, bits_stored=16)
    return ds


VARIANTS: dict[str, Callable[[Dataset], Dataset]] = {
    "as-is": v_identity,
    "inverted-photometric": v_invert_photometric,
    "16-bit": v_16bit,
    "12-bit": v_12bit,
    "rescale-signed": v_rescale_signed,
    "rescale-slope": v_rescale_slope,
}

# codec -> DCMTK tool and arguments (input, output appended), or None for pydicom J2K.
CODECS: dict[str, tuple[str, ...] | None] = {
    "uncompressed": (),
    "rle": ("dcmcrle",),
    "jpeg-ls-lossless": ("dcmcjpls",),
    "jpeg-lossless-sv1": ("dcmcjpeg", "+e1"),
    "jpeg-lossless": ("dcmcjpeg", "+el"),
    "big-endian": ("dcmconv", "+tb"),
    "deflated": ("dcmconv", "+td"),
    "jpeg2000-lossless": None,
}


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    return {name: read_pixels(_make_base(name)) for name in BASES}


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("base", list(BASES))
def test_same_image_same_array(
    base: str, variant: str, codec: str, references: dict[str, np.ndarray], tmp_path: Path, run_tool
) -> None:
    ds = VARIANTS[variant](_make_base(base))
    plain = tmp_path / "plain.dcm"
    ds.save_as(plain, enforce_file_format=True)
    spec = CODECS[codec]
    if spec is None:
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        path = tmp_path / "j2k.dcm"
        ds.save_as(path, enforce_file_format=True)
    elif spec:
        path = tmp_path / f"{codec}.dcm"
        done = run_tool(spec[0], *spec[1:], plain, path)
        assert done.returncode == 0, done.stderr[-500:]
    else:
        path = plain
    written = pydicom.dcmread(path)
    expected_ts = {
        "rle": "1.2.840.10008.1.2.5",
        "jpeg-ls-lossless": "1.2.840.10008.1.2.4.80",
        "jpeg-lossless-sv1": "1.2.840.10008.1.2.4.70",
        "jpeg-lossless": "1.2.840.10008.1.2.4.57",
        "big-endian": "1.2.840.10008.1.2.2",
        "deflated": "1.2.840.10008.1.2.1.99",
        "jpeg2000-lossless": "1.2.840.10008.1.2.4.90",
    }.get(codec, "1.2.840.10008.1.2.1")
    assert written.file_meta.TransferSyntaxUID == expected_ts  # really re-encoded

    got = read_pixels_file(path)
    ref = references[base]
    assert got.shape == ref.shape
    diff = float(np.max(np.abs(got.astype(np.float64) - ref)))
    assert diff <= TOLERANCE, f"{base}/{variant}/{codec}: max |diff| = {diff:.5f}"
