"""C-FIND, C-GET and C-MOVE against a private Orthanc as the PACS (skipped without Orthanc)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom

from dicom_io.config import ListenerConfig
from dicom_io.listener import Listener
from dicom_io.retrieve import RetrieveMethod, find_study_instances, retrieve_study
from dicom_io.spool import Spool
from tests.retrieve.conftest import CXR, CXR_J2K, Orthanc, make_study


def test_c_find_and_c_get_from_orthanc(tmp_path: Path, orthanc: Callable[..., Orthanc]) -> None:
    study = make_study(tmp_path / "in", [CXR, CXR_J2K], series=2)
    pacs = orthanc()
    pacs.upload(study.files)

    found = find_study_instances(pacs.address, study.study_uid, calling_ae="PNEUMO")
    assert {i.sop_instance_uid for i in found} == set(study.sop_uids)

    spool = Spool(tmp_path / "spool")
    result = retrieve_study(pacs.address, study.study_uid, spool, calling_ae="PNEUMO")

    assert result.ok, result.failed
    assert set(result.received) == set(study.sop_uids)
    for f, uid in zip(study.files, study.sop_uids, strict=True):
        got, sent = pydicom.dcmread(result.received[uid]), pydicom.dcmread(f)
        if sent.file_meta.TransferSyntaxUID.is_compressed:
            # Not decompressed: the JPEG 2000 file came in its own presentation context.
            assert got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert got.PixelData == sent.PixelData

    # Named instances: IMAGE level requests, one the PACS lacks.
    again = retrieve_study(
        pacs.address,
        study.study_uid,
        Spool(tmp_path / "spool2"),
        calling_ae="PNEUMO",
        sop_instance_uids=[study.sop_uids[1], "1.2.826.0.1.99999.2"],
    )
    assert set(again.received) == {study.sop_uids[1]}
    assert [f.reason for f in again.failed] == ["not on the PACS"]


def test_c_move_from_orthanc_to_our_listener(
    tmp_path: Path, orthanc: Callable[..., Orthanc]
) -> None:
    study = make_study(tmp_path / "in", [CXR, CXR_J2K])
    listener = Listener(
        ListenerConfig(
            spool_dir=tmp_path / "spool", ae_title="PNEUMO", port=0, spool_reserve_bytes=0
        ),
        lambda ready: None,
    )
    listener.start()
    try:
        pacs = orthanc({"PNEUMO": listener.port})
        pacs.upload(study.files)
        result = retrieve_study(
            pacs.address,
            study.study_uid,
            listener.spool,
            method=RetrieveMethod.MOVE,
            calling_ae="PNEUMO",
        )
    finally:
        listener.stop()

    assert result.ok, result.failed
    assert set(result.received) == set(study.sop_uids)
    assert listener.stats["stored"] == 2
