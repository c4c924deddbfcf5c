"""The heatmap Secondary Capture: blended RGB, burned-in warning, valid per dciodvfy."""

from __future__ import annotations

import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_io.pixels import read_pixels
from dicom_io.sc import (
    BURNED_IN_TEXT,
    blend_heatmap,
    build_heatmap_sc,
    burn_in_text,
    heatmap_sc_uid,
)
from dicom_io.sr import AlgorithmInfo, result_sr_uid
from dicom_io.uids import is_valid_uid
from tests.paths import DICOM_DATA

CXR = DICOM_DATA / "cxr"
NIH = "nih_gcp_1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

ALGORITHM = AlgorithmInfo(
    name="pneumo-cnn",
    version="1.4.2",
    manufacturer="Pneumo Project",
    model_name="PneumoNet-CXR",
    parameters={},
)


def _load(name: str) -> tuple[Dataset, np.ndarray]:
    path = CXR / name
    if not path.is_file():
        pytest.skip(f"shared file {name} not present")
    ds = pydicom.dcmread(path)
    return ds, read_pixels(ds)


def _blob(shape: tuple[int, int], cy: float = 0.55, cx: float = 0.3) -> np.ndarray:
    """A synthetic heatmap: one Gaussian hot spot over the right lung (image left)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    heat = np.exp(-(((yy - h * cy) / (h * 0.12)) ** 2 + ((xx - w * cx) / (w * 0.1)) ** 2))
    heat[heat < 1e-3] = 0.0  # truly cold elsewhere
    return heat


def _sc(**kwargs: object) -> Dataset:
    """build_heatmap_sc, checked with dciodvfy: every SC built in these tests must have no error."""
    sc = build_heatmap_sc(algorithm=ALGORITHM, **kwargs)  # type: ignore[arg-type]
    tool = Path("/usr/bin/dciodvfy")
    if not tool.is_file():
        pytest.skip("dciodvfy not installed")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sc.dcm"
        sc.save_as(path, enforce_file_format=True)
        done = subprocess.run([str(tool), str(path)], capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).splitlines()
    assert [line for line in lines if line.startswith(("Error", "Abort"))] == []
    return sc


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "udacity_aihcnd_test2.dcm", NIH])
def test_valid_per_dciodvfy(name: str, tmp_path: Path, dciodvfy) -> None:
    # MONOCHROME1 CR with orientation; 8-bit DX with body part; DX with neither.
    ds, img = _load(name)
    sc = build_heatmap_sc(
        source=ds, image=img, heatmap=_blob(img.shape), algorithm=ALGORITHM, revision=0
    )
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    errors, _ = dciodvfy(path)
    assert errors == []


def test_header(tmp_path: Path) -> None:
    ds, img = _load("RG1_UNCR.dcm")
    sc = _sc(source=ds, image=img, heatmap=_blob(img.shape), revision=3)
    assert sc.SOPClassUID == SECONDARY_CAPTURE
    assert sc.StudyInstanceUID == ds.StudyInstanceUID and sc.PatientID == ds.PatientID
    assert sc.SeriesInstanceUID != ds.SeriesInstanceUID
    assert sc.BurnedInAnnotation == "YES"
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert (sc.Rows, sc.Columns) == img.shape
    assert list(sc.PatientOrientation) == list(ds.PatientOrientation)
    # Deterministic, valid, distinct from the SR's UID and per revision.
    assert sc.SOPInstanceUID == heatmap_sc_uid(ds.StudyInstanceUID, ds.SOPInstanceUID, "1.4.2", 3)
    assert is_valid_uid(sc.SOPInstanceUID)
    assert sc.SOPInstanceUID != result_sr_uid(ds.StudyInstanceUID, "1.4.2", 3)
    assert sc.SOPInstanceUID != heatmap_sc_uid(ds.StudyInstanceUID, ds.SOPInstanceUID, "1.4.2", 4)
    # Round trip through a file keeps the pixels.
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).pixel_array.shape == (*img.shape, 3)


def test_unknown_orientation_not_invented() -> None:
    ds, img = _load(NIH)
    assert "PatientOrientation" not in ds
    sc = _sc(source=ds, image=img, heatmap=_blob(img.shape), revision=0)
    assert "PatientOrientation" in sc and not sc.PatientOrientation


def test_blend_keeps_cold_regions_and_colours_hot_ones() -> None:
    ds, img = _load("udacity_aihcnd_test2.dcm")
    heat = _blob(img.shape)
    rgb = blend_heatmap(img, heat)
    assert rgb.dtype == np.uint8 and rgb.shape == (*img.shape, 3)
    cold = heat == 0
    grey = np.rint(img * 255)
    for channel in range(3):  # untouched radiograph where there is no heat
        assert np.abs(rgb[..., channel][cold].astype(int) - grey[cold]).max() <= 1
    hot = heat > 0.5
    r, b = rgb[..., 0][hot].astype(int), rgb[..., 2][hot].astype(int)
    assert (r - b).mean() > 40  # warm colours at the hot spot


def test_burned_in_text_band() -> None:
    ds, img = _load("udacity_aihcnd_test2.dcm")
    heat = np.zeros(img.shape)
    plain = blend_heatmap(img, heat)
    sc = _sc(source=ds, image=img, heatmap=heat, revision=0)
    px = sc.pixel_array
    changed = np.any(px != plain, axis=-1)
    rows = np.nonzero(changed.any(axis=1))[0]
    # Only a band at the top is touched, and it holds white text on black.
    assert rows.min() == 0 and rows.max() < img.shape[0] // 8
    band = px[: rows.max() + 1]
    assert (band == 0).all(axis=-1).mean() > 0.5
    assert (band >= 250).all(axis=-1).sum() > 200
    # The text really differs from an ASCII hyphen: the em dash is drawn.
    hyphen = burn_in_text(plain, BURNED_IN_TEXT.replace("\u2014", "-"))
    assert not np.array_equal(hyphen[: rows.max() + 1], band)


def test_tiny_image_still_gets_text() -> None:
    out = burn_in_text(np.full((40, 64, 3), 128, np.uint8))
    assert out.shape == (40, 64, 3) and (out == 0).any() and (out >= 250).any()


@pytest.mark.parametrize(
    "heat",
    [np.zeros((5, 5)), np.full((4, 4), np.nan), np.full((4, 4), 1.5), np.zeros((4, 4, 3))],
    ids=["shape", "nan", "range", "ndim"],
)
def test_bad_heatmap_refused(heat: np.ndarray) -> None:
    ds, _ = _load("udacity_aihcnd_test2.dcm")
    with pytest.raises(ValueError):
        build_heatmap_sc(
            source=ds, image=np.zeros((4, 4)), heatmap=heat, algorithm=ALGORITHM, revision=0
        )


def test_long_identity_strings_stay_valid() -> None:
    ds, img = _load("udacity_aihcnd_test2.dcm")
    long = AlgorithmInfo(
        name="n" * 80,
        version="1.4.2+" + "f" * 70,
        manufacturer="M" * 70,
        model_name="m" * 90,
        parameters={},
    )
    sc = build_heatmap_sc(
        source=ds, image=img, heatmap=_blob(img.shape), algorithm=long, revision=0
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sc.dcm"
        sc.save_as(path, enforce_file_format=True)
        done = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True)
    assert not [ln for ln in (done.stdout + done.stderr).splitlines() if ln.startswith("Error")]


def test_small_overshoot_clipped() -> None:
    img = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    heat = np.full((4, 4), 1.004, np.float32)  # bicubic up-sampling overshoot
    assert np.array_equal(blend_heatmap(img, heat), blend_heatmap(img, np.ones((4, 4))))


def test_no_patient_name_in_warnings() -> None:
    ds, img = _load("udacity_aihcnd_test2.dcm")
    ds.PatientName = "Qwertzuiop"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _sc(source=ds, image=img, heatmap=_blob(img.shape), revision=0)
    assert not [w for w in caught if "Qwertzuiop" in str(w.message)]


def test_sc_builds_from_invalid_dates_and_nul_in_ids() -> None:
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    source, image = _load("RG1_UNCR.dcm")
    for tag, vr, value in [
        (0x00100030, "DA", b"19800231"),
        (0x00080020, "DA", b"1980-01-02"),
        (0x00100020, "LO", b"PAT\x0017"),
    ]:
        source[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    sc = build_heatmap_sc(
        source=source, image=image, heatmap=_blob(image.shape), algorithm=ALGORITHM, revision=0
    )
    assert sc.PatientBirthDate in (None, "") and sc.StudyDate in (None, "")
    assert sc.PatientID == "PAT17"
    assert source.get_item(0x00100020).value == b"PAT\x0017"  # the caller's data set as read
