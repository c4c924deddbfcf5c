"""C-FIND, C-GET and C-MOVE against DCMTK ``dcmqrscp`` as the PACS."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from dicom_io.config import ListenerConfig
from dicom_io.listener import Listener
from dicom_io.retrieve import (
    PacsAddress,
    RetrieveError,
    RetrieveMethod,
    find_study_instances,
    retrieve_study,
)
from dicom_io.spool import Spool
from tests.conftest import free_port
from tests.retrieve.conftest import CXR, CXR_J2K, DcmQrScp, make_study


def test_pacs_address_parses_and_validates() -> None:
    address = PacsAddress.parse(" PACS@10.1.2.3:104 ")
    assert (address.ae_title, address.host, address.port, str(address)) == (
        "PACS",
        "10.1.2.3",
        104,
        "PACS@10.1.2.3:104",
    )
    for bad in ("PACS@host", "@host:104", "PACS@host:0", "PACS@host:70000", "A" * 17 + "@h:1"):
        with pytest.raises(ValueError, match="PACS address"):
            PacsAddress.parse(bad)
    with pytest.raises(ValueError, match="AE title"):
        PacsAddress.parse("BAD\\AE@host:104")


def test_c_find_lists_the_study_instances(
    tmp_path: Path, dcmqrscp: Callable[..., DcmQrScp]
) -> None:
    study = make_study(tmp_path / "in", [CXR, CXR, CXR_J2K], series=2)
    other = make_study(tmp_path / "other", [CXR])
    pacs = dcmqrscp([*study.files, *other.files])

    found = find_study_instances(pacs.address, study.study_uid, calling_ae="PNEUMO")

    assert {i.sop_instance_uid for i in found} == set(study.sop_uids)
    assert {i.series_uid for i in found} == set(study.series_uids)
    by_uid = {i.sop_instance_uid: i for i in found}
    for f, uid in zip(study.files, study.sop_uids, strict=True):
        # dcmqrscp returns SOP Class UID: the C-GET proposes exactly those classes.
        assert by_uid[uid].sop_class_uid in ("", str(pydicom.dcmread(f).SOPClassUID))
    assert find_study_instances(pacs.address, "1.2.3.4.5.6.7", calling_ae="PNEUMO") == ()


def test_c_get_writes_the_study_into_the_spool(
    tmp_path: Path, dcmqrscp: Callable[..., DcmQrScp]
) -> None:
    # dcmqrscp accepts uncompressed syntaxes only on incoming associations, so
    # it cannot C-GET a JPEG 2000 file as stored (Orthanc can: test_orthanc.py).
    study = make_study(tmp_path / "in", [CXR, CXR], series=2)
    pacs = dcmqrscp(list(study.files))
    spool = Spool(tmp_path / "spool")

    result = retrieve_study(pacs.address, study.study_uid, spool, calling_ae="PNEUMO")

    assert result.ok, result.failed
    assert result.method is RetrieveMethod.GET
    assert set(result.requested) == set(result.received) == set(study.sop_uids)
    assert result.statuses == (0x0000,)  # one STUDY level C-GET
    for f, uid in zip(study.files, study.sop_uids, strict=True):
        path = result.received[uid]
        assert path.parent.parent == spool.study_dir(study.study_uid)
        assert path.stat().st_mode & 0o777 == 0o600
        got, sent = pydicom.dcmread(path), pydicom.dcmread(f)
        # Uncompressed either way (dcmqrscp prefers Explicit VR); same pixels.
        assert got.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
        assert got.SOPInstanceUID == uid
        assert got.PixelData == sent.PixelData
    assert spool.sop_uids_on_disk(study.study_uid) == set(study.sop_uids)


def test_c_get_of_named_instances_and_one_the_pacs_lacks(
    tmp_path: Path, dcmqrscp: Callable[..., DcmQrScp]
) -> None:
    study = make_study(tmp_path / "in", [CXR, CXR, CXR], series=2)
    pacs = dcmqrscp(list(study.files))
    spool = Spool(tmp_path / "spool")
    wanted = [study.sop_uids[0], study.sop_uids[2], "1.2.826.0.1.99999.1"]

    result = retrieve_study(
        pacs.address, study.study_uid, spool, calling_ae="PNEUMO", sop_instance_uids=wanted
    )

    assert not result.ok
    assert set(result.received) == {study.sop_uids[0], study.sop_uids[2]}
    assert [(f.sop_instance_uid, f.reason) for f in result.failed] == [
        ("1.2.826.0.1.99999.1", "not on the PACS")
    ]
    assert len(result.statuses) == 2  # IMAGE level, one request per instance
    assert spool.sop_uids_on_disk(study.study_uid) == {study.sop_uids[0], study.sop_uids[2]}


def test_c_move_delivers_to_our_listener(tmp_path: Path, dcmqrscp: Callable[..., DcmQrScp]) -> None:
    study = make_study(tmp_path / "in", [CXR, CXR])
    ready: list[object] = []
    listener = Listener(
        ListenerConfig(
            spool_dir=tmp_path / "spool", ae_title="PNEUMO", port=0, spool_reserve_bytes=0
        ),
        ready.append,
    )
    listener.start()
    try:
        pacs = dcmqrscp(list(study.files), move_destinations={"PNEUMO": listener.port})
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
    assert listener.stats["stored"] == 2  # through the listener, as any C-STORE
    for path in result.received.values():
        assert path.is_file()


def test_c_move_to_an_unknown_destination_fails_per_instance(
    tmp_path: Path, dcmqrscp: Callable[..., DcmQrScp]
) -> None:
    study = make_study(tmp_path / "in", [CXR])
    pacs = dcmqrscp(list(study.files))  # knows no move destination
    result = retrieve_study(
        pacs.address,
        study.study_uid,
        Spool(tmp_path / "spool"),
        method=RetrieveMethod.MOVE,
        calling_ae="PNEUMO",
    )
    assert not result.ok and not result.received
    (failure,) = result.failed
    assert failure.status is not None and failure.status not in (0x0000, 0xB000)
    assert "move failed (status 0x" in failure.reason


def test_no_pacs_is_a_clear_error(tmp_path: Path) -> None:
    nobody = PacsAddress("PACS", "127.0.0.1", free_port())
    with pytest.raises(RetrieveError, match=r"association with PACS PACS@127\.0\.0\.1:\d+ failed"):
        retrieve_study(nobody, "1.2.3.4", Spool(tmp_path / "spool"), timeout_seconds=2)
