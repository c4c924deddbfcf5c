"""Header hygiene (dicom_io.sanitize): invalid DA/TM blanked with a code, NUL stripped."""

from __future__ import annotations

import logging

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicom_io.sanitize import (
    HeaderFix,
    HeaderFixKind,
    redact_library_logs,
    sanitize_header,
    sanitized_copy,
)


def raw(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    """Put an element into ``ds`` exactly as pydicom leaves it after reading a file."""
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def hostile() -> Dataset:
    ds = Dataset()
    raw(ds, 0x00080020, "DA", b"1980-01-02")  # Study Date: not the DA form
    raw(ds, 0x00080030, "TM", b"25:61:00")  # Study Time
    raw(ds, 0x00080050, "SH", b"ACC\x00\x0042")  # Accession Number with NULs
    raw(ds, 0x00100020, "LO", b"PAT\x0017")  # Patient ID with a NUL
    raw(ds, 0x00100030, "DA", b"19800231")  # Patient's Birth Date: 31 February
    raw(ds, 0x00100040, "CS", b"F ")  # fine
    raw(ds, 0x00080021, "DA", b"20240229")  # fine (leap day)
    raw(ds, 0x00080031, "TM", b"235960.123456")  # fine (leap second)
    return ds


def test_invalid_dates_and_times_blanked_nuls_stripped_with_codes() -> None:
    ds = hostile()
    fixes = sanitize_header(ds)
    assert {f.code for f in fixes} == {
        "invalid-da:StudyDate",
        "invalid-tm:StudyTime",
        "nul-stripped:AccessionNumber",
        "nul-stripped:PatientID",
        "invalid-da:PatientBirthDate",
    }
    assert ds.StudyDate in (None, "") and ds.PatientBirthDate in (None, "")
    assert ds.StudyTime in (None, "")
    assert "StudyDate" in ds  # blanked, not removed: Type 2 stays present (PS3.3 §C.7.2.1)
    assert ds.PatientID == "PAT17" and ds.AccessionNumber == "ACC42"
    assert (ds.PatientSex, ds.SeriesDate, ds.SeriesTime) == ("F", "20240229", "235960.123456")
    assert sanitize_header(ds) == ()  # idempotent


def test_codes_never_carry_values_and_logs_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fixes = sanitize_header(hostile())
    text = " ".join(f.code for f in fixes) + caplog.text
    for value in ("1980-01-02", "19800231", "PAT", "ACC", "25:61"):
        assert value not in text
    # pydicom's own "invalid value" log lines quote the value: redacted once installed.
    redact_library_logs()
    logging.getLogger("pydicom").warning("Invalid value for VR DA: '19800231'.")
    assert "19800231" not in caplog.text


def test_sanitized_copy_leaves_the_original_untouched() -> None:
    ds = hostile()
    ds.file_meta = Dataset()
    copy, fixes = sanitized_copy(ds)
    assert len(fixes) == 5
    assert copy.PatientID == "PAT17" and copy.file_meta is ds.file_meta
    assert ds.get_item(0x00100020).value == b"PAT\x0017"
    assert ds.get_item(0x00100030).value == b"19800231"


def test_fix_kinds_are_one_vocabulary() -> None:
    assert HeaderFix("PatientID", HeaderFixKind.NUL_STRIPPED).code == "nul-stripped:PatientID"
    assert str(HeaderFixKind.INVALID_DATE) == "invalid-da"


def test_implicit_vr_file_is_repaired_too(tmp_path) -> None:
    """Implicit VR Little Endian, the default transfer syntax, carries no VR on the wire."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ImplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.PatientBirthDate = "19800231"
    ds.PatientID = "ID\x00X"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "implicit.dcm"
    ds.save_as(path, enforce_file_format=True)

    read = pydicom.dcmread(path)
    assert read.get_item("PatientBirthDate").VR is None  # raw, VR unknown until looked up
    codes = {fix.code for fix in sanitize_header(read)}

    assert codes == {"invalid-da:PatientBirthDate", "nul-stripped:PatientID"}
    assert read.PatientBirthDate in ("", None)
    assert read.PatientID == "IDX"
