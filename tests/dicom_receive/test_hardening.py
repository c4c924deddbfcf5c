"""Issue 8 on the receive side, over real associations: deflate bombs, journal failures,
recovery from the files on disk, and the explicit allow-any calling AE."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_io import assembly
from dicom_io.assembly import Trigger
from dicom_io.part10 import encode_file_meta
from dicom_io.spool import Spool, StoreResult
from tests.dicom_receive.dicom_receive_helpers import (
    DEFLATED,
    Collector,
    deflate_bomb,
    encode_wire,
    eventually,
    make_instance,
    scu_store,
)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700


def _send_file_as_is(port: int, path: Path, sop_class: str, transfer_syntax: str) -> int:
    """C-STORE a Part 10 file's data set bytes exactly as stored (pynetdicom's chunked send)."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(sop_class, transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMO")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status) if status else -1
    finally:
        assoc.release()


def _bomb_file(tmp_path: Path, pixel_bytes: int) -> tuple[Path, pydicom.Dataset]:
    ds = make_instance(pydicom.uid.generate_uid())
    del ds.PixelData
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    meta = encode_file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), DEFLATED, "")
    path.write_bytes(meta + deflate_bomb(ds, pixel_bytes))
    return path, ds


def test_deflate_bomb_gets_a_failure_status_and_is_not_spooled(
    make_listener, tmp_path, monkeypatch
):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    listener, ready = make_listener(max_inflated_bytes=16 << 20)
    bomb, ds = _bomb_file(tmp_path, 256 << 20)  # < 1 MB on the wire, 256 MB inflated
    assert bomb.stat().st_size < 1 << 20
    status = _send_file_as_is(listener.port, bomb, str(ds.SOPClassUID), DEFLATED)
    assert status == OUT_OF_RESOURCES
    assert list(listener.spool.root.glob("1*/*/*.dcm")) == []
    assert listener.stats["refused"] == 1 and listener.stats["stored"] == 0
    # A deflated data set under the cap still arrives, as sent.
    small, small_ds = _bomb_file(tmp_path, 1 << 20)
    assert _send_file_as_is(listener.port, small, str(small_ds.SOPClassUID), DEFLATED) == SUCCESS
    [result] = ready.wait(1)
    assert result.instances[0].transfer_syntax_uid == DEFLATED


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "two-receiving-processes"])
def test_failed_journal_write_fails_the_store_and_the_retry_succeeds(
    make_listener, monkeypatch, processes
):
    """With receiving processes the journal is written by their parent (this process):
    its failure still reaches the child's C-STORE answer."""
    listener, ready = make_listener(receiving_processes=processes)
    real = assembly.write_atomic
    failures = []

    def broken_journal(path, data):
        failures.append(path)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(assembly, "write_atomic", broken_journal)
    ds = make_instance(pydicom.uid.generate_uid())
    assert scu_store(listener.port, [ds]) == [OUT_OF_RESOURCES]  # never Success
    # (a child's counters reach its parent just before the C-STORE answer; allow the race)
    assert eventually(lambda: listener.stats["failed"] == 1)
    assert failures and listener.stats["stored"] == 0

    monkeypatch.setattr(assembly, "write_atomic", real)
    assert scu_store(listener.port, [ds]) == [SUCCESS]  # the sender's retry
    record = listener.assembler.study_record(str(ds.StudyInstanceUID))
    assert record["pending"] is True or record["dispatch_count"] == 1  # journal now written
    [result] = ready.wait(1)
    assert [i.sop_instance_uid for i in result.instances] == [str(ds.SOPInstanceUID)]


def test_late_instance_spooled_before_its_journal_update_is_recovered(make_listener, tmp_path):
    """Crash between spooling a late instance and its journal update: recovery compares
    the files on disk with the journal's dispatched set and dispatches the study again."""
    spool = tmp_path / "spool"
    listener, ready = make_listener(spool=spool)
    study = pydicom.uid.generate_uid()
    first = make_instance(study, seed=1)
    scu_store(listener.port, [first])
    ready.wait(1)
    listener.stop()
    record = listener.assembler.study_record(study)
    assert record["pending"] is False and record["dispatched"] == [str(first.SOPInstanceUID)]

    # The late instance reaches the spool, and the process dies before the journal update.
    late = make_instance(study, str(first.SeriesInstanceUID), seed=2)
    Spool(spool).store(
        encode_wire(late),
        sop_class_uid=str(late.SOPClassUID),
        sop_instance_uid=str(late.SOPInstanceUID),
        transfer_syntax_uid=str(late.file_meta.TransferSyntaxUID),
    )

    _, ready2 = make_listener(spool=spool, study_quiet_seconds=0.2)
    [result] = ready2.wait(1)
    assert result.trigger is Trigger.RECOVERED and result.amended
    assert {i.sop_instance_uid for i in result.instances} == {
        str(first.SOPInstanceUID),
        str(late.SOPInstanceUID),
    }


def test_fully_dispatched_study_is_not_recovered(make_listener, tmp_path):
    spool = tmp_path / "spool"
    listener, ready = make_listener(spool=spool)
    scu_store(listener.port, [make_instance(pydicom.uid.generate_uid())])
    ready.wait(1)
    listener.stop()
    _, ready2 = make_listener(spool=spool, study_quiet_seconds=0.2)
    time.sleep(0.8)
    assert ready2.items == []


def test_ready_study_trigger_is_typed(make_listener):
    listener, ready = make_listener()
    scu_store(listener.port, [make_instance(pydicom.uid.generate_uid())])
    [result] = ready.wait(1)
    assert isinstance(result.trigger, Trigger)
    assert f"{result.trigger}" == result.trigger.value  # logs and JSON carry the code


def test_explicit_allow_any_accepts_every_calling_ae_on_any_address(make_listener):
    listener, _ = make_listener(host="0.0.0.0", allowed_aets=frozenset({"*"}))
    for calling in ("ANYONE", "ELSE"):
        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="PNEUMO")
        assert assoc.is_established
        assoc.release()


def test_study_folders_and_files_are_private(make_listener):
    listener, ready = make_listener()
    ds = make_instance(pydicom.uid.generate_uid())
    scu_store(listener.port, [ds])
    [result] = ready.wait(1)
    path = result.instances[0].path
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert path.parent.parent.stat().st_mode & 0o777 == 0o700
    journal = listener.spool.state_dir / f"{ds.StudyInstanceUID}.json"
    assert journal.stat().st_mode & 0o777 == 0o600


def test_low_free_space_warns_before_the_reserve_refuses(make_listener, tmp_path, caplog):
    import shutil

    free = shutil.disk_usage(tmp_path).free
    listener, ready = make_listener(spool_reserve_bytes=int(free * 0.6))  # free < 2 x reserve
    assert scu_store(listener.port, [make_instance(pydicom.uid.generate_uid())]) == [SUCCESS]
    ready.wait(1)
    warnings = [r for r in caplog.records if "spool free space low" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited, however many checks ran


def _stored(spool: Spool, study: str) -> StoreResult:
    ds = make_instance(study)
    return spool.store(
        encode_wire(ds),
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )


def test_release_reported_after_the_close_still_starts_the_grace(tmp_path: Path) -> None:
    """pynetdicom reports the connection close and the release from two threads, in
    either order: a release reported second must not leave the study to the quiet window."""
    ready = Collector()
    assembler = assembly.StudyAssembler(
        Spool(tmp_path / "spool"), ready, quiet_seconds=30.0, release_grace_seconds=0.1
    )
    assembler.start()
    try:
        for k, order in enumerate((("closed", "released"), ("released", "closed")), start=1):
            study = pydicom.uid.generate_uid()
            association = hash((study, order))
            assembler.instance_stored(_stored(assembler.spool, study), association)
            for event in order:
                getattr(assembler, f"association_{event}")(association)
            result = ready.wait(k, timeout=5)[-1]
            assert (result.study_uid, result.trigger) == (study, Trigger.RELEASED), order
    finally:
        assembler.stop()


def test_a_close_without_release_leaves_the_quiet_window(tmp_path: Path) -> None:
    ready = Collector()
    assembler = assembly.StudyAssembler(
        Spool(tmp_path / "spool"), ready, quiet_seconds=0.5, release_grace_seconds=0.05
    )
    assembler.start()
    try:
        study = pydicom.uid.generate_uid()
        assembler.instance_stored(_stored(assembler.spool, study), 7)
        assembler.association_closed(7)  # an abort: no release follows
        [result] = ready.wait(1, timeout=5)
        assert result.trigger is Trigger.QUIET
    finally:
        assembler.stop()
