"""Part 10 encoding and header reading (dicom_io.part10), bounded inflation included."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io import part10
from dicom_io.part10 import (
    HeaderError,
    InflationLimitExceeded,
    inflate_bounded,
    read_header,
    read_received_header,
)
from dicom_io.spool import RefusalKind, Spool, SpoolRefusal
from tests.dicom_receive.dicom_receive_helpers import (
    DEFLATED,
    dataset_bytes,
    deflate,
    deflate_bomb,
    make_instance,
    write_instance,
)


@pytest.mark.parametrize(
    "transfer_syntax, calling_aet",
    [
        (ExplicitVRLittleEndian, "MODALITY"),
        ("1.2.840.10008.1.2", "ODD"),  # odd lengths: UI padded with NUL, AE with space
        ("1.2.840.10008.1.2.4.50", ""),  # no calling AE: element omitted
    ],
)
def test_file_meta_bytes_equal_pydicoms_encoding(transfer_syntax, calling_aet):
    """The hand-encoded File Meta Information (PS3.10 §7.1) is what pydicom writes."""
    sop_class, sop_instance = "1.2.840.10008.5.1.4.1.1.1.1", pydicom.uid.generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = part10.IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = part10.IMPLEMENTATION_VERSION_NAME
    if calling_aet:
        meta.SourceApplicationEntityTitle = calling_aet
    expected = io.BytesIO()
    expected.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(expected, meta, enforce_standard=True)
    ours = part10.encode_file_meta(sop_class, sop_instance, transfer_syntax, calling_aet)
    assert ours == expected.getvalue()


@pytest.mark.parametrize(
    "transfer_syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"]
)
def test_header_read_in_every_dataset_encoding(tmp_path, transfer_syntax):
    """The filing UIDs are read from memory in implicit, big endian and deflated data sets."""
    spool = Spool(tmp_path / "spool")
    study = pydicom.uid.generate_uid()
    ds = make_instance(study, NumberOfStudyRelatedInstances=3)
    buf = DicomBytesIO()
    buf.is_little_endian = transfer_syntax != "1.2.840.10008.1.2.2"
    buf.is_implicit_VR = transfer_syntax == "1.2.840.10008.1.2"
    write_dataset(buf, ds)
    wire = buf.getvalue()
    if transfer_syntax.endswith(".99"):
        wire = deflate(wire)
    result = spool.store(
        wire,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid=transfer_syntax,
    )
    assert result.instance.series_uid == ds.SeriesInstanceUID
    assert result.instance.path.parent.parent.name == study
    assert result.expected_count == 3
    assert dataset_bytes(result.instance.path) == wire  # stored exactly as received
    back = pydicom.dcmread(result.instance.path)
    assert back.SOPInstanceUID == ds.SOPInstanceUID


def _header_only(study: str) -> pydicom.Dataset:
    ds = make_instance(study)
    del ds.PixelData
    return ds


def test_inflation_is_bounded_and_keeps_only_a_prefix():
    bomb = deflate_bomb(_header_only(pydicom.uid.generate_uid()), 64 << 20)
    assert len(bomb) < 1 << 20  # under a megabyte on the wire
    with pytest.raises(InflationLimitExceeded) as info:
        inflate_bounded(bomb, limit=16 << 20)
    assert "limit" in str(info.value)
    prefix = inflate_bounded(bomb, limit=65 << 20, keep=4096)
    assert len(prefix) == 4096


def test_inflation_of_garbage_is_a_header_error():
    with pytest.raises(HeaderError):
        inflate_bounded(b"\xff" * 64, limit=1 << 20)


def testdeflate_bomb_refused_by_the_spool_before_anything_is_written(tmp_path):
    spool = Spool(tmp_path / "spool", max_inflated_bytes=16 << 20)
    ds = _header_only(pydicom.uid.generate_uid())
    bomb = deflate_bomb(ds, 64 << 20)
    with pytest.raises(SpoolRefusal) as info:
        spool.store(
            bomb,
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            transfer_syntax_uid=DEFLATED,
        )
    assert info.value.kind is RefusalKind.TOO_LARGE
    assert [p for p in (tmp_path / "spool").rglob("*") if p.is_file()] == []
    # Under the cap the same kind of data set is stored as received.
    small = deflate_bomb(ds, 1 << 20)
    stored = spool.store(
        small,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid=DEFLATED,
    )
    assert dataset_bytes(stored.instance.path) == small


def test_received_header_values_are_raw_and_absent_is_none():
    ds = make_instance(pydicom.uid.generate_uid())
    del ds.SeriesInstanceUID
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    header = read_received_header(buf.getvalue(), ExplicitVRLittleEndian, max_inflated_bytes=1)
    assert header.study_uid == ds.StudyInstanceUID
    assert header.series_uid is None
    assert header.sop_instance_uid == ds.SOPInstanceUID
    with pytest.raises(HeaderError) as info:
        read_received_header(b"\xff" * 64, DEFLATED, max_inflated_bytes=1 << 20)
    assert "DEFLATE" in str(info.value)


def test_read_header_stops_before_pixels(tmp_path: Path):
    ds = make_instance(pydicom.uid.generate_uid(), rows=256, cols=256)
    path = write_instance(ds, tmp_path)
    header = read_header(path)
    assert "PixelData" not in header
    assert header.Rows == 256 and header.SOPInstanceUID == ds.SOPInstanceUID
    assert read_header(path, specific_tags=["Modality"]).get("Rows") is None
