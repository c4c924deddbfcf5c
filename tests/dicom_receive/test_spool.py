"""The spool on its own: paths only from valid UIDs, exact bytes, duplicate handling."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io.spool import RefusalKind, Spool, SpoolRefusal, StoreOutcome
from tests.dicom_receive.dicom_receive_helpers import dataset_bytes, encode_wire, make_instance


def _store(spool: Spool, ds: pydicom.Dataset, **kw):
    args = dict(
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        calling_aet="MODALITY",
    )
    args.update(kw)
    return spool.store(encode_wire(ds), **args)


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
        spool.store(
            b"\x08\x00\x18\x00UI\xff\xff" + b"\x00" * 7,
            sop_class_uid="1.2.3",
            sop_instance_uid="1.2.3.4",
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
    assert info.value.kind in (RefusalKind.UNREADABLE, RefusalKind.INVALID_UID)
    assert not any(spool.incoming.iterdir())


def test_store_layout_meta_and_duplicates(tmp_path):
    spool = Spool(tmp_path / "spool")
    study = pydicom.uid.generate_uid()
    ds = make_instance(study, NumberOfStudyRelatedInstances=4)
    wire = encode_wire(ds)
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
    assert dataset_bytes(inst.path) == encode_wire(changed)
    assert not any(spool.incoming.iterdir())

    # The directory is the truth: a scan finds the same instance.
    [scanned] = spool.scan_study(study)
    assert (scanned.sop_instance_uid, scanned.path, scanned.calling_aet) == (
        inst.sop_instance_uid,
        inst.path,
        "MODALITY",
    )


def test_purge_study_keeps_files_written_after_the_cutoff_then_removes_empty_folders(tmp_path):
    spool = Spool(tmp_path / "spool")
    study = "1.2.826.0.1.3680043.8.498.77"
    old, late = make_instance(study, seed=1), make_instance(study, seed=2)
    old_path = _store(spool, old).instance.path
    os.utime(old_path, (time.time() - 3600, time.time() - 3600))  # received an hour ago
    late_path = _store(spool, late).instance.path  # arrives while the purge decides

    cutoff = datetime.now(UTC) - timedelta(minutes=30)
    assert spool.purge_study(study, received_before=cutoff) == [str(old.SOPInstanceUID)]
    assert not old_path.exists() and late_path.exists()
    assert spool.purge_study(study) == [str(late.SOPInstanceUID)]
    assert not spool.study_dir(study).exists()
    assert spool.purge_study(study) == []  # repeating deletes nothing more
    assert spool.study_uids_on_disk() == []


def test_a_second_spool_on_a_live_root_leaves_writes_in_progress(tmp_path):
    Spool(tmp_path / "spool")
    in_progress = tmp_path / "spool" / ".incoming" / ".abc.part"
    in_progress.write_bytes(b"being written by the listener")
    Spool(tmp_path / "spool", clean_incoming=False)  # e.g. pneumo purge
    assert in_progress.exists()
    Spool(tmp_path / "spool")  # the listener restarting: a crash's leftover
    assert not in_progress.exists()
