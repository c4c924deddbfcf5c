"""Selection: which instances the model may read, and why the others are skipped."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicom_io.pixels import PixelErrorKind
from dicom_io.selection import Selection, SkipReason, select_file, select_instance
from tests.paths import DICOM_DATA

DICOM = DICOM_DATA

CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"


def _need(rel: str) -> Path:
    path = DICOM / rel
    if not path.is_file():
        pytest.skip(f"shared file {rel} not present")
    return path


def header(**attrs: object) -> Dataset:
    """A minimal frontal chest DX header, overridable per test."""
    ds = Dataset()
    ds.SOPClassUID = DX
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.SamplesPerPixel = 1
    ds.Rows = 8
    ds.Columns = 8
    ds.BitsAllocated = 16
    ds.PixelData = b"\0" * 128
    for key, value in attrs.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


# Expected outcomes from what the shared README/index.csv say the files are.
SHARED_EXPECTED = {
    "cxr/RG1_UNCR.dcm": None,  # CR chest PA
    "cxr/RG1_J2KI.dcm": None,
    "cxr/nih_gcp_1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm": None,
    "cxr/udacity_aihcnd_test1.dcm": None,  # PatientPosition PA
    "cxr/udacity_aihcnd_test2.dcm": None,  # PatientPosition AP
    "other/udacity_aihcnd_test4.dcm": "body-part:RIBCAGE",
    "other/udacity_aihcnd_test5.dcm": "modality:CT",
    "other/udacity_aihcnd_test6.dcm": "view:XX",
    "other/CT_small.dcm": "modality:CT",
    "other/test-SR.dcm": "modality:SR",
    "other/rtplan.dcm": "modality:RTPLAN",
    "other/waveform_ecg.dcm": "modality:ECG",
    "other/MR_small.dcm": "modality:MR",
    "other/deid_cookies_image1.dcm": "modality:none",
    "other/RG3_J2KI.dcm": "body-part:EXTREMITY",  # CR, AP, but a tibia
    "other/SC_rgb.dcm": "modality:OT",  # SC without CHEST
}


@pytest.mark.parametrize("rel,expected", sorted(SHARED_EXPECTED.items()))
def test_shared_files(rel: str, expected: str | None) -> None:
    path = _need(rel)
    got = select_file(path)
    assert got == Selection(expected is None, expected)
    # The full dataset gives the same answer as the header-only read.
    assert select_instance(pydicom.dcmread(path, force=True)) == got


def test_every_shared_file_gets_an_answer() -> None:
    files = sorted(DICOM.glob("*/*.dcm")) if DICOM.is_dir() else []
    if not files:
        pytest.skip("shared DICOM not present")
    for path in files:
        sel = select_file(path)
        assert sel.selected == (sel.reason is None), path.name
        if not sel.selected:
            assert sel.reason and " " not in sel.reason


def test_frontal_views_accepted() -> None:
    for view in ("PA", "AP", "pa ", "ap"):
        assert select_instance(header(ViewPosition=view)).selected, view


@pytest.mark.parametrize("view", ["LL", "RL", "LATERAL"])
def test_lateral_rejected(view: str) -> None:
    assert select_instance(header(ViewPosition=view)) == Selection(False, "lateral-view")


@pytest.mark.parametrize("view,reason", [("RLO", "view:RLO"), ("LLD", "view:LLD")])
def test_oblique_and_decubitus_rejected(view: str, reason: str) -> None:
    assert select_instance(header(ViewPosition=view)) == Selection(False, reason)


def test_patient_position_fallback() -> None:
    # View Position absent: Patient Position is used only when it looks like a view.
    assert select_instance(header(ViewPosition=None, PatientPosition="AP")).selected
    assert select_instance(header(ViewPosition=None, PatientPosition="LL")).reason == "lateral-view"
    assert select_instance(header(ViewPosition=None, PatientPosition="XX")).reason == "view:XX"
    assert select_instance(header(ViewPosition=None, PatientPosition="HFS")).selected
    # View Position wins over Patient Position.
    assert select_instance(header(ViewPosition="LL", PatientPosition="PA")).reason == "lateral-view"
    # Neither: unknown view is accepted (documented choice).
    assert select_instance(header(ViewPosition=None)).selected


def test_modalities() -> None:
    assert select_instance(header(Modality="CR", SOPClassUID=CR)).selected
    assert select_instance(header(Modality="CT")).reason == "modality:CT"
    assert select_instance(header(Modality=None)).reason == "modality:none"
    # Secondary Capture marked CHEST is accepted; without CHEST it is not.
    assert select_instance(header(SOPClassUID=SC, Modality="OT")).selected
    assert (
        select_instance(header(SOPClassUID=SC, Modality="OT", BodyPartExamined=None)).reason
        == "modality:OT"
    )
    # OT that is not a Secondary Capture is not accepted even when marked CHEST.
    assert select_instance(header(Modality="OT")).reason == "modality:OT"


def test_body_part() -> None:
    assert select_instance(header(BodyPartExamined=None)).selected
    assert select_instance(header(BodyPartExamined="chest")).selected
    assert select_instance(header(BodyPartExamined="KNEE")).reason == "body-part:KNEE"


def test_frames_and_photometric() -> None:
    assert select_instance(header(NumberOfFrames=1)).selected
    assert select_instance(header(NumberOfFrames=3)).reason == "multi-frame"
    tampered = header()
    # A raw element as read from a file: the value is only parsed on access.
    tampered[0x00280008] = RawDataElement(Tag(0x00280008), "IS", 4, b"abc ", 0, True, True)
    assert select_instance(tampered).reason == "multi-frame"
    assert select_instance(header(PhotometricInterpretation="MONOCHROME1")).selected
    assert (
        select_instance(header(PhotometricInterpretation="RGB", SamplesPerPixel=3)).reason
        == "not-monochrome:RGB"
    )
    assert select_instance(header(PhotometricInterpretation=None)).reason == "not-monochrome:none"


def test_for_processing_skipped() -> None:
    assert select_instance(header(PresentationIntentType="FOR PRESENTATION")).selected
    assert (
        select_instance(header(PresentationIntentType="FOR PROCESSING")).reason == "for-processing"
    )
    for_processing = header(SOPClassUID="1.2.840.10008.5.1.4.1.1.1.1.1")
    assert select_instance(for_processing).reason == "for-processing"


def test_pixel_data() -> None:
    assert select_instance(header(PixelData=None, Rows=None)).reason == "no-pixel-data"
    # Header-only reads (stop_before_pixels) keep Rows and are not rejected here.
    assert select_instance(header(PixelData=None)).selected


def test_tampered_values_are_sanitised() -> None:
    reason = select_instance(header(Modality="C<T>/../x")).reason
    assert reason is not None and reason.startswith("modality:")
    assert "/" not in reason and "<" not in reason and "." not in reason
    long = select_instance(header(BodyPartExamined="X" * 200)).reason
    assert long is not None and len(long) <= len("body-part:") + 16


def test_unparseable_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"DICM" * 3)
    sel = select_file(bad)
    assert not sel.selected and sel.reason


def test_reason_helpers() -> None:
    assert SkipReason.undecodable(PixelErrorKind.DECODE_FAILED) == "undecodable:decode-failed"
    assert SkipReason.undecodable(PixelErrorKind.DECODER_CRASHED) == "undecodable:decoder-crashed"
    with pytest.raises(ValueError):  # only PixelErrorKind codes, never free text
        SkipReason.undecodable("anything else")
    assert SkipReason.modality("CT") == "modality:CT"
    assert str(SkipReason.LATERAL_VIEW) == "lateral-view"
    assert Selection.skip(SkipReason.MULTI_FRAME) == Selection(False, "multi-frame")


def test_select_file_reads_the_header_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """select_file asks pydicom to stop before Pixel Data: a 7 MB image costs its header."""
    import pydicom

    src = _need("cxr/RG1_UNCR.dcm")
    calls: list[dict[str, object]] = []
    real = pydicom.dcmread

    def spy(*args: object, **kwargs: object) -> Dataset:
        calls.append(kwargs)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pydicom, "dcmread", spy)
    assert select_file(src).selected
    assert calls and all(c.get("stop_before_pixels") is True for c in calls)
