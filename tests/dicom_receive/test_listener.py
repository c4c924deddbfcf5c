"""The listener against real DCMTK and pynetdicom peers over loopback."""

from __future__ import annotations

import csv
import logging
import shutil
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_io.uids import is_valid_uid
from tests.conftest import need_dcmtk
from tests.dicom_receive.dicom_receive_helpers import (
    DCMTK_ENV,
    copy_shared,
    dataset_bytes,
    eventually,
    make_instance,
    run_dcmtk,
    scu_store,
    storescu,
    write_instance,
)
from tests.paths import REPO

pytestmark = pytest.mark.dcmtk

CXR_FILES = ["cxr/RG1_UNCR.dcm", "cxr/RG1_J2KI.dcm", "cxr/udacity_aihcnd_test2.dcm"]


def _echo(port: int, calling: str = "ECHOSCU") -> subprocess.CompletedProcess:
    return run_dcmtk("/usr/bin/echoscu", "-aet", calling, "-aec", "PNEUMO", "127.0.0.1", str(port))


def test_echo_and_unknown_calling_ae_rejected(make_listener):
    need_dcmtk("echoscu")
    listener, _ = make_listener(allowed_aets=frozenset({"PACS"}))
    ok = _echo(listener.port, "PACS")
    assert ok.returncode == 0, ok.stderr
    refused = _echo(listener.port, "STRANGER")
    assert refused.returncode != 0
    assert "Rejected" in refused.stderr or "rejected" in refused.stderr.lower()
    # pynetdicom's view of the same rejection: permanent, calling AE not recognised.
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PNEUMO")
    assert assoc.is_rejected
    rej = assoc.acceptor.primitive
    assert (rej.result, rej.result_source, rej.diagnostic) == (0x01, 0x01, 0x03)


RAW_FILES = [
    "cxr/RG1_UNCR.dcm",  # Explicit VR LE, 7 MB
    "cxr/RG1_J2KI.dcm",  # JPEG 2000
    "other/image_dfl.dcm",  # Deflated Explicit VR LE
    "other/MR_small_bigendian.dcm",  # Explicit VR Big Endian
    "other/test-SR.dcm",  # an SR
]


def test_spooled_bytes_are_exactly_the_bytes_on_the_wire(make_listener, dicom_data, tmp_path):
    """Data sets streamed unchanged by the sender are spooled byte-for-byte."""
    from pynetdicom import _config

    listener, ready = make_listener()
    files = copy_shared(RAW_FILES, tmp_path / "in")
    ae = AE(ae_title="RAWSCU")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    for h in headers:
        ae.add_requested_context(h.SOPClassUID, h.file_meta.TransferSyntaxUID)
    # The test's sender streams each file's data set as stored (no decode/encode),
    # so the bytes on the wire are exactly the file's bytes after its meta.
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="PNEUMO")
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(f).Status) for f in files]
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert statuses == [0] * len(files)
    ready.wait(1)
    time.sleep(0.6)
    spooled = {i.sop_instance_uid: i for s in ready.items for i in s.instances}
    for f, src in zip(files, headers, strict=True):
        inst = spooled[str(src.SOPInstanceUID)]
        assert inst.path == (
            listener.spool.root
            / str(src.StudyInstanceUID)
            / str(src.SeriesInstanceUID)
            / f"{src.SOPInstanceUID}.dcm"
        )
        assert inst.transfer_syntax_uid == str(src.file_meta.TransferSyntaxUID)
        assert inst.calling_aet == "RAWSCU"
        assert dataset_bytes(inst.path) == dataset_bytes(f), f.name
    # The spooled JPEG 2000 file is a valid Part 10 file whose pixels still decode.
    j2k = spooled[str(headers[1].SOPInstanceUID)]
    assert pydicom.dcmread(j2k.path).pixel_array.shape == (1955, 1841)
    assert not any(listener.spool.incoming.iterdir()), "temporary files left behind"


def test_storescu_cxr_received(make_listener, dicom_data, tmp_path):
    need_dcmtk("storescu", "dcmsend")
    listener, ready = make_listener()
    files = copy_shared(CXR_FILES, tmp_path / "in")
    r = storescu(listener.port, files[0], files[2])
    assert r.returncode == 0, r.stderr
    # storescu cannot propose JPEG 2000 for an arbitrary file; dcmsend -dn can.
    r = run_dcmtk(
        "/usr/bin/dcmsend", "-dn", "-aec", "PNEUMO", "127.0.0.1", str(listener.port), str(files[1])
    )
    assert r.returncode == 0, r.stderr
    time.sleep(0.6)
    ready.wait(1)
    spooled = {i.sop_instance_uid: i for s in ready.items for i in s.instances}
    for f in files:
        src = pydicom.dcmread(f, stop_before_pixels=True)
        inst = spooled[str(src.SOPInstanceUID)]
        back = pydicom.dcmread(inst.path, stop_before_pixels=True)
        assert back.StudyInstanceUID == src.StudyInstanceUID
        assert back.file_meta.TransferSyntaxUID == inst.transfer_syntax_uid
    # An Implicit VR file DCMTK sends without changes arrives byte-identical.
    udacity = spooled[str(pydicom.dcmread(files[2], stop_before_pixels=True).SOPInstanceUID)]
    assert dataset_bytes(udacity.path) == dataset_bytes(files[2])


def test_ct_and_sr_accepted_and_spooled(make_listener, dicom_data, tmp_path):
    need_dcmtk("storescu")
    listener, ready = make_listener()
    files = copy_shared(["other/CT_small.dcm", "other/test-SR.dcm"], tmp_path / "in")
    r = storescu(listener.port, *files)
    assert r.returncode == 0, r.stderr
    studies = ready.wait(2)
    classes = {i.sop_class_uid for s in studies for i in s.instances}
    assert classes == {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.88.33"}
    for s in studies:
        for inst in s.instances:
            assert inst.path.is_file() and inst.size == inst.path.stat().st_size


def test_every_odd_file_is_stored_or_refused_without_crashing(
    make_listener, dicom_data, tmp_path, caplog
):
    """All of dicom/other: DCMTK sends what it can read, pynetdicom the rest."""
    caplog.set_level(logging.INFO)
    need_dcmtk("dcmsend", "echoscu")
    from dicom_io.config import Destination
    from dicom_io.send import send_files

    listener, ready = make_listener()
    rows = list(csv.DictReader((dicom_data / "other" / "index.csv").open()))
    src_dir = tmp_path / "other"
    files = copy_shared([r["file"] for r in rows], src_dir)
    report = tmp_path / "dcmsend.txt"
    run_dcmtk(
        "/usr/bin/dcmsend",
        "--no-halt",
        "+f",
        "-dn",
        "-aec",
        "PNEUMO",
        "+crf",
        str(report),
        "127.0.0.1",
        str(listener.port),
        *map(str, files),
        timeout=120,
    )
    # Files DCMTK refused to read (truncated pixel data, missing meta) go by pynetdicom.
    text = report.read_text()
    not_sent = [
        f for f in files if f"Filename      : {f}" not in text or _dcmsend_not_sent(text, f)
    ]
    on_wire = [f for f in files if f not in not_sent]
    assert len(on_wire) > 30
    if not_sent:
        result = send_files(
            not_sent,
            Destination("PNEUMO", "127.0.0.1", listener.port),
            calling_ae="PYSCU",
            retries=0,
        )
        on_wire += [
            f
            for f in not_sent
            if f in result.sent or any(p == f and r.startswith("status") for p, r in result.failed)
        ]

    assert _echo(listener.port).returncode == 0, "listener died"

    # Expected outcome per file, computed from the file itself (not from the listener).
    # Files no sender could put on the wire (no transfer syntax, unparseable) are
    # left out: they never reach a listener.
    expected_stored: set[str] = set()
    expected_refused = 0
    for f in on_wire:
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        uids = [ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
        if all(u is not None and is_valid_uid(str(u)) for u in uids):
            expected_stored.add(str(ds.SOPInstanceUID))
        else:
            expected_refused += 1
    time.sleep(0.8)
    spooled = {p.stem for p in listener.spool.root.glob("*/*/*.dcm")}
    assert len(expected_stored) > 20
    assert spooled == expected_stored
    # Every file with missing/invalid UIDs was refused with an error status.
    assert expected_refused >= 1
    assert listener.stats["refused"] == expected_refused
    assert listener.stats["failed"] == 0
    # bad_sequence.dcm carries a 64-hex-digit "UID"; malformed values never reach the log.
    assert "dccc9599087131742838cc1162a630fea87ba9bf61ac09bfda90d4adfa5ddaed" not in caplog.text
    assert "refused (0xA900)" in caplog.text
    # Each spooled study was handed on (recorded), none lost.
    dispatched = {i.sop_instance_uid for s in ready.items for i in s.instances}
    assert spooled <= dispatched | set(listener.assembler.pending_study_uids())


def _dcmsend_not_sent(report: str, path: Path) -> bool:
    block = report.split(f"Filename      : {path}", 1)[1].split("Filename", 1)[0]
    return "<not sent>" in block or "no acceptable" in block


def test_aborted_association_keeps_instances_and_study_completes(make_listener):
    listener, ready = make_listener(study_quiet_seconds=0.5, study_release_grace_seconds=0.1)
    study = pydicom.uid.generate_uid()
    series = pydicom.uid.generate_uid()
    datasets = [make_instance(study, series, seed=i) for i in range(3)]
    statuses = scu_store(listener.port, datasets, end="abort")
    assert statuses == [0, 0, 0]
    [result] = ready.wait(1)
    assert result.study_uid == study
    assert result.trigger == "quiet"  # an abort is not a release
    sent_uids = {str(d.SOPInstanceUID) for d in datasets}
    assert {i.sop_instance_uid for i in result.instances} == sent_uids
    assert not result.amended


def test_release_triggers_before_quiet_window(make_listener):
    listener, ready = make_listener(study_quiet_seconds=5.0, study_release_grace_seconds=0.2)
    study = pydicom.uid.generate_uid()
    t0 = time.monotonic()
    scu_store(listener.port, [make_instance(study, seed=i) for i in range(2)], end="release")
    [result] = ready.wait(1, timeout=4)
    assert result.trigger == "released"
    assert ready.times[0] - t0 < 3.0
    assert len(result.instances) == 2


def test_expected_count_triggers_without_release(make_listener):
    listener, ready = make_listener(study_quiet_seconds=20.0, study_release_grace_seconds=20.0)
    from pynetdicom import AE as _AE

    study = pydicom.uid.generate_uid()
    datasets = [make_instance(study, seed=i, NumberOfStudyRelatedInstances=3) for i in range(3)]
    ae = _AE(ae_title="HOLDER")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PNEUMO")
    try:
        for ds in datasets[:2]:
            assert assoc.send_c_store(ds).Status == 0
        time.sleep(0.5)
        assert ready.items == []  # 2 of 3: not yet
        assert assoc.send_c_store(datasets[2]).Status == 0
        [result] = ready.wait(1, timeout=3)  # association still open
        assert result.trigger == "expected-count"
        assert len(result.instances) == 3
    finally:
        assoc.release()


def test_late_arrival_gives_amended_dispatch_with_all_instances(make_listener):
    listener, ready = make_listener()
    study = pydicom.uid.generate_uid()
    first = [make_instance(study, seed=i) for i in range(2)]
    scu_store(listener.port, first)
    ready.wait(1)
    late = make_instance(study, seed=9)
    scu_store(listener.port, [late])
    results = ready.wait(2)
    assert results[1].amended and not results[0].amended
    assert {i.sop_instance_uid for i in results[1].instances} == {
        str(d.SOPInstanceUID) for d in first + [late]
    }
    # The journal records the dispatch right after the callback returned.
    assert eventually(lambda: listener.assembler.study_record(study).get("dispatch_count") == 2)


def test_duplicates_identical_noop_different_replaced(make_listener):
    listener, ready = make_listener()
    study = pydicom.uid.generate_uid()
    ds = make_instance(study, seed=1)
    scu_store(listener.port, [ds])
    ready.wait(1)
    path = next(listener.spool.root.glob(f"{study}/*/*.dcm"))
    before = path.read_bytes()

    scu_store(listener.port, [ds])  # identical bytes
    time.sleep(1.0)
    assert len(ready.items) == 1, "identical duplicate must not re-dispatch"
    assert listener.stats["duplicate"] == 1
    assert path.read_bytes() == before

    changed = make_instance(study, ds.SeriesInstanceUID, ds.SOPInstanceUID, seed=2)
    scu_store(listener.port, [changed])
    results = ready.wait(2)
    assert results[1].amended and len(results[1].instances) == 1
    assert path.read_bytes() != before
    assert pydicom.dcmread(path).PixelData == changed.PixelData
    assert eventually(lambda: listener.assembler.study_record(study).get("dispatch_count") == 2)
    record = listener.assembler.study_record(study)
    assert record["replaced"] == 1 and record["replaced_recent"] == [str(ds.SOPInstanceUID)]


def test_pending_studies_survive_restart(make_listener, tmp_path):
    spool = tmp_path / "spool"
    listener, ready = make_listener(
        spool=spool, study_quiet_seconds=30.0, study_release_grace_seconds=30.0
    )
    study = pydicom.uid.generate_uid()
    datasets = [make_instance(study, seed=i) for i in range(3)]
    scu_store(listener.port, datasets, end="abort")
    listener.stop()
    assert ready.items == []

    listener2, ready2 = make_listener(spool=spool, study_quiet_seconds=0.3)
    [result] = ready2.wait(1)
    assert result.trigger == "recovered" and not result.amended
    sent_uids = {str(d.SOPInstanceUID) for d in datasets}
    assert {i.sop_instance_uid for i in result.instances} == sent_uids
    assert all(i.calling_aet == "TESTSCU" for i in result.instances)
    listener2.stop()

    # Once dispatched it is not dispatched again by a further restart.
    _, ready3 = make_listener(spool=spool, study_quiet_seconds=0.3)
    time.sleep(1.0)
    assert ready3.items == []


def test_failing_callback_is_retried_not_dropped(make_listener, caplog):
    listener, ready = make_listener(study_quiet_seconds=0.3)
    ready.fail_next = 2
    study = pydicom.uid.generate_uid()
    scu_store(listener.port, [make_instance(study)])
    [result] = ready.wait(1, timeout=8)
    assert result.study_uid == study
    assert "study-ready callback failed" in caplog.text


def test_invalid_uid_refused_without_phi_in_logs(make_listener, caplog):
    caplog.set_level(logging.DEBUG)
    listener, ready = make_listener()
    bad = make_instance("1.2.3.abc")  # not a UID: must never become a path
    good = make_instance(pydicom.uid.generate_uid())
    statuses = scu_store(listener.port, [bad, good])
    assert statuses[0] == 0xA900 and statuses[1] == 0
    assert list(listener.spool.root.glob("1.2.3.abc*")) == []
    assert listener.stats["refused"] == 1
    ready.wait(1)
    assert "SECRET" not in caplog.text and "PHI-12345" not in caplog.text
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("dicom_io"))
    assert "refused (0xA900)" in ours
    assert "1.2.3.abc" not in ours  # the malformed value itself is never logged by us


def test_write_failure_returns_out_of_resources(make_listener, tmp_path):
    listener, ready = make_listener()
    # Make the folders it writes new files in unusable (temporary files and the pool of
    # pre-created files): every write fails like a broken disk.
    broken = (listener.spool.incoming, listener.spool.pool_dir)
    for folder in broken:
        shutil.rmtree(folder, ignore_errors=True)  # the pool folder is made on first use
        folder.write_text("not a directory")
    statuses = scu_store(listener.port, [make_instance(pydicom.uid.generate_uid())])
    assert statuses == [0xA700]
    assert list(listener.spool.root.glob("1*/*/*.dcm")) == []
    # Repaired disk: the sender's retry succeeds.
    for folder in broken:
        folder.unlink()
        folder.mkdir()
    statuses = scu_store(listener.port, [make_instance(pydicom.uid.generate_uid())])
    assert statuses == [0]


def test_free_space_reserve_rejects_transiently(make_listener):
    listener, _ = make_listener(spool_reserve_bytes=1 << 60)  # more than any disk
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PNEUMO")
    assert assoc.is_rejected
    rej = assoc.acceptor.primitive
    assert rej.result == 0x02  # transient: the PACS retries later
    assert (rej.result_source, rej.diagnostic) == (0x03, 0x02)


def test_parallel_associations(make_listener, tmp_path):
    """Four concurrent storescu processes, one study each, nothing lost."""
    need_dcmtk("storescu")

    listener, ready = make_listener()
    folders, studies = [], []
    for k in range(4):
        study = pydicom.uid.generate_uid()
        studies.append(study)
        folder = tmp_path / f"s{k}"
        for i in range(5):
            write_instance(make_instance(study, seed=10 * k + i, rows=128, cols=128), folder)
        folders.append(folder)
    procs = [
        subprocess.Popen(
            ["/usr/bin/storescu", "+sd", "-aec", "PNEUMO", "127.0.0.1", str(listener.port), str(f)],
            env=DCMTK_ENV,
        )
        for f in folders
    ]
    assert all(p.wait(60) == 0 for p in procs)
    results = ready.wait(4)
    assert sorted(r.study_uid for r in results) == sorted(studies)
    assert all(len(r.instances) == 5 for r in results)


def test_instance_callback_errors_do_not_affect_storage(make_listener):
    seen = []

    def on_instance(inst):
        seen.append(inst)
        raise ValueError("consumer bug")

    listener, ready = make_listener(on_instance=on_instance)
    study = pydicom.uid.generate_uid()
    ds = make_instance(study)
    assert scu_store(listener.port, [ds, ds]) == [0, 0]  # second is an identical duplicate
    [result] = ready.wait(1)
    # The identical duplicate is not reported again.
    assert [i.sop_instance_uid for i in seen] == [str(ds.SOPInstanceUID)]
    assert seen[0] == result.instances[0]
    assert _echo(listener.port).returncode == 0


def test_association_limit_rejects_transiently(make_listener):
    listener, _ = make_listener(max_associations=1)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    first = ae.associate("127.0.0.1", listener.port, ae_title="PNEUMO")
    try:
        assert first.is_established
        second = ae.associate("127.0.0.1", listener.port, ae_title="PNEUMO")
        assert second.is_rejected
        rej = second.acceptor.primitive
        assert (rej.result, rej.result_source, rej.diagnostic) == (0x02, 0x03, 0x02)
    finally:
        first.release()
    # The slot is free again once the first association's thread has ended;
    # pynetdicom counts it until then, so a sender retrying promptly gets in.
    deadline = time.monotonic() + 5
    while True:
        third = ae.associate("127.0.0.1", listener.port, ae_title="PNEUMO")
        if third.is_established or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert third.is_established
    third.release()


def test_space_running_out_mid_association_gives_out_of_resources(make_listener):
    import dataclasses

    listener, _ = make_listener()
    ds1 = make_instance(pydicom.uid.generate_uid())
    ds2 = make_instance(pydicom.uid.generate_uid())
    ae = AE(ae_title="PACS")
    ae.add_requested_context(ds1.SOPClassUID, ds1.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PNEUMO")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds1).Status == 0
        # The disk "fills up" (the reserve now exceeds any free space).
        listener.config = dataclasses.replace(listener.config, spool_reserve_bytes=1 << 60)
        assert assoc.send_c_store(ds2).Status == 0xA700
    finally:
        assoc.release()
    assert not list(listener.spool.root.glob(f"{ds2.StudyInstanceUID}*"))


def test_module_entry_point_prints_json_lines(tmp_path):
    """``python -m dicom_io listen`` as ops and the benchmark use it."""
    import json
    import signal
    import sys

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dicom_io",
            "listen",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--spool",
            str(tmp_path / "spool"),
            "--quiet",
            "0.3",
            "--grace",
            "0.1",
            "--reserve-mb",
            "0",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = json.loads(proc.stdout.readline())
        assert first["event"] == "listening" and first["port"] > 0
        src = make_instance(pydicom.uid.generate_uid(), PatientBirthDate="19700101")
        path = write_instance(src, tmp_path / "in")
        r = storescu(first["port"], path)
        assert r.returncode == 0, r.stderr
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "study-ready"
        assert ready["study_uid"] == src.StudyInstanceUID
        assert ready["instances"] == 1 and ready["trigger"] in ("released", "quiet")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["event"] == "stopped" and stopped["stored"] == 1
    for phi in ("SECRET", "PHI-12345", "19700101"):
        assert phi not in err and phi not in out
