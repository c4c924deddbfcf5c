"""The spool on its own: paths only from valid UIDs, exact bytes, duplicate handling."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io.spool import RefusalKind, Spool, SpoolRefusal, StoreOutcome

from dicom_receive_helpers import dataset_bytes, make_instance


def _encode(ds: pydicom.Dataset, implicit: bool = False) -> bytes:
    """The data set as a sender would put it on the wire (no file meta)."""
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def _store(spool: Spool, ds: pydicom.Dataset, **kw):
    args = dict(
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        calling_aet="MODALITY",
    )
    args.update(kw)
    return spool.store(_encode(ds), **args)


@pytest.mark.parametrize(
    "study_uid",
    ["../../etc", "1.2.840/../../x", "1.2.3.abc", "1.2." + "3" * 70, "01.2.3", "1..2", ""],
)
def test_invalid_study_uid_never_becomes_a_path(tmp_path, study_uid):
    spool = Spool(tmp_path / "spool")
    ds = make_instance(study_uid or "1.2.3")
    if not study_uid:
        del ds.StudyInstanceUID
    with pytest.raises(SpoolRefusal) as info:
        _store(spool, ds)
    assert info.value.kind is RefusalKind.INVALID_UID
    assert study_uid == "" or study_uid not in str(info.value)  # value never echoed
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == []  # not in the spool, not next to it, no temp file left


def test_command_and_dataset_uid_mismatch_refused(tmp_path):
    spool = Spool(tmp_path / "spool")
    ds = make_instance(pydicom.uid.generate_uid())
    with pytest.raises(SpoolRefusal) as info:
        _store(spool, ds, sop_instance_uid=pydicom.uid.generate_uid())
    assert info.value.kind is RefusalKind.UID_MISMATCH


def test_garbage_is_refused_as_unreadable(tmp_path):
    spool = Spool(tmp_path / "spool")
    with pytest.raises(SpoolRefusal) as info:
        spool.store(b"\x08\x00\x18\x00UI\xff\xff" + b"\x00" * 7, sop_class_uid="1.2.3",
                    sop_instance_uid="1.2.3.4", transfer_syntax_uid=ExplicitVRLittleEndian)
    assert info.value.kind in (RefusalKind.UNREADABLE, RefusalKind.INVALID_UID)
    assert not any(spool.incoming.iterdir())


def test_store_layout_meta_and_duplicates(tmp_path):
    spool = Spool(tmp_path / "spool")
    study = pydicom.uid.generate_uid()
    ds = make_instance(study, NumberOfStudyRelatedInstances=4)
    wire = _encode(ds)
    first = _store(spool, ds)
    inst = first.instance
    assert first.outcome is StoreOutcome.NEW and first.expected_count == 4
    assert inst.path == spool.root / study / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert inst.size == inst.path.stat().st_size
    assert dataset_bytes(inst.path) == wire
    meta = pydicom.filereader.read_file_meta_info(inst.path)
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert meta.SourceApplicationEntityTitle.strip() == "MODALITY"
    assert inst.received_at.tzinfo is not None

    assert _store(spool, ds).outcome is StoreOutcome.DUPLICATE
    changed = make_instance(study, ds.SeriesInstanceUID, ds.SOPInstanceUID, seed=5)
    replaced = _store(spool, changed)
    assert replaced.outcome is StoreOutcome.REPLACED
    assert dataset_bytes(inst.path) == _encode(changed)
    assert not any(spool.incoming.iterdir())

    # The directory is the truth: a scan finds the same instance.
    [scanned] = spool.scan_study(study)
    assert (scanned.sop_instance_uid, scanned.path, scanned.calling_aet) == (
        inst.sop_instance_uid, inst.path, "MODALITY")


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
    import io

    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    from dicom_io import spool as spool_module

    sop_class, sop_instance = "1.2.840.10008.5.1.4.1.1.1.1", pydicom.uid.generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = spool_module.IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = spool_module.IMPLEMENTATION_VERSION_NAME
    if calling_aet:
        meta.SourceApplicationEntityTitle = calling_aet
    expected = io.BytesIO()
    expected.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(expected, meta, enforce_standard=True)
    ours = spool_module.encode_file_meta(sop_class, sop_instance, transfer_syntax, calling_aet)
    assert ours == expected.getvalue()


@pytest.mark.parametrize(
    "transfer_syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"]
)
def test_header_read_in_every_dataset_encoding(tmp_path, transfer_syntax):
    """The filing UIDs are read from memory in implicit, big endian and deflated data sets."""
    import zlib

    spool = Spool(tmp_path / "spool")
    study = pydicom.uid.generate_uid()
    ds = make_instance(study, NumberOfStudyRelatedInstances=3)
    buf = DicomBytesIO()
    buf.is_little_endian = transfer_syntax != "1.2.840.10008.1.2.2"
    buf.is_implicit_VR = transfer_syntax == "1.2.840.10008.1.2"
    write_dataset(buf, ds)
    wire = buf.getvalue()
    if transfer_syntax.endswith(".99"):
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        wire = deflater.compress(wire) + deflater.flush()
    result = spool.store(wire, sop_class_uid=str(ds.SOPClassUID),
                         sop_instance_uid=str(ds.SOPInstanceUID),
                         transfer_syntax_uid=transfer_syntax)
    assert result.instance.series_uid == ds.SeriesInstanceUID
    assert result.instance.path.parent.parent.name == study
    assert result.expected_count == 3
    assert dataset_bytes(result.instance.path) == wire  # stored exactly as received
    back = pydicom.dcmread(result.instance.path)
    assert back.SOPInstanceUID == ds.SOPInstanceUID


def test_partial_writes_are_continued(tmp_path, monkeypatch):
    """``writev`` may write less than asked (signals, huge buffers): the rest still lands."""
    import os

    from dicom_io import spool as spool_module

    real_writev = os.writev
    calls = []

    def short_writev(fd, buffers):
        calls.append(len(buffers))
        data = b"".join(bytes(b) for b in buffers)[:777]  # at most 777 bytes per call
        return real_writev(fd, [data])

    monkeypatch.setattr(spool_module.os, "writev", short_writev)
    spool = Spool(tmp_path / "spool")
    ds = make_instance(pydicom.uid.generate_uid(), rows=64, cols=64)
    result = _store(spool, ds)
    assert len(calls) > 10
    assert result.instance.size == result.instance.path.stat().st_size
    assert dataset_bytes(result.instance.path) == _encode(ds)
