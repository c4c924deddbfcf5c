"""The spool on its own: paths only from valid UIDs, exact bytes, duplicate handling,
the one-flush commit through the pool and its start-up recovery."""

from __future__ import annotations

import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io import spool as spool_module
from dicom_io.spool import (
    COMMIT_CHECK_CREATOR_UID,
    POOL_DIR,
    RefusalKind,
    Spool,
    SpoolRefusal,
    StoreOutcome,
)
from tests.conftest import need_dcmtk
from tests.dicom_receive.dicom_receive_helpers import (
    dataset_bytes,
    encode_wire,
    eventually,
    free_port,
    make_instance,
    write_instance,
)
from tests.paths import REPO


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


# --- the one-flush commit: pool files, the commit check, start-up recovery -----

# A real process that stores one instance and dies by SIGKILL after the pool
# file is written and flushed, before its rename: what a crash leaves behind.
_CRASH_BEFORE_RENAME = """
import os, signal, sys
from pathlib import Path
from dicom_io import spool as spool_module

def crash(path, final):
    os.kill(os.getpid(), signal.SIGKILL)

spool_module.rename_pooled = crash
root, wire, sop_class, sop_instance, syntax = sys.argv[1:]
spool_module.Spool(Path(root)).store(
    Path(wire).read_bytes(), sop_class_uid=sop_class, sop_instance_uid=sop_instance,
    transfer_syntax_uid=syntax, calling_aet="MODALITY",
)
"""


def _crash_before_rename(root: Path, ds: pydicom.Dataset, work: Path) -> Path:
    """Store ``ds`` in a child that is killed before the rename; return the pool file left."""
    wire = work / f"{ds.SOPInstanceUID}.wire"
    wire.write_bytes(encode_wire(ds))
    child = subprocess.run(
        [sys.executable, "-c", _CRASH_BEFORE_RENAME, str(root), str(wire)]
        + [str(ds.SOPClassUID), str(ds.SOPInstanceUID), ExplicitVRLittleEndian],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode(errors="replace")
    [written] = _written_pool_files(root)
    return written


def _written_pool_files(root: Path) -> list[Path]:
    pool = root / POOL_DIR
    return [p for p in pool.iterdir() if p.stat().st_size] if pool.is_dir() else []


def _final_path(root: Path, ds: pydicom.Dataset) -> Path:
    return root / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"


def test_a_complete_pool_file_is_invisible_until_a_restart_promotes_it(tmp_path):
    root = tmp_path / "spool"
    ds = make_instance(pydicom.uid.generate_uid(), rows=512, cols=512)
    pool_file = _crash_before_rename(root, ds, tmp_path)
    assert not _final_path(root, ds).exists()

    # Readers that are not the listener neither see nor touch it.
    reader = Spool(root, clean_incoming=False)
    assert reader.study_uids_on_disk() == []
    assert reader.scan_study(str(ds.StudyInstanceUID)) == []
    assert reader.purge_study(str(ds.StudyInstanceUID)) == []
    assert pool_file.exists()

    restarted = Spool(root)  # the listener's start-up
    final = _final_path(root, ds)
    assert dataset_bytes(final) == encode_wire(ds)
    meta = pydicom.filereader.read_file_meta_info(final)
    assert meta.PrivateInformationCreatorUID == COMMIT_CHECK_CREATOR_UID
    assert meta.SourceApplicationEntityTitle.strip() == "MODALITY"
    assert stat.S_IMODE(final.stat().st_mode) == 0o600
    assert list((root / POOL_DIR).iterdir()) == []  # found files are never reused
    [found] = restarted.scan_study(str(ds.StudyInstanceUID))
    assert found.sop_instance_uid == str(ds.SOPInstanceUID) and found.path == final
    assert pydicom.dcmread(final).PixelData == ds.PixelData


@pytest.mark.parametrize("damage", ["truncated", "zeroed tail", "flipped byte", "header only"])
def test_a_torn_pool_file_is_removed_not_promoted(tmp_path, damage):
    root = tmp_path / "spool"
    ds = make_instance(pydicom.uid.generate_uid(), rows=256, cols=256)
    pool_file = _crash_before_rename(root, ds, tmp_path)
    raw = bytearray(pool_file.read_bytes())
    if damage == "truncated":  # the size reached the disk, the last blocks did not
        raw = raw[:-1000]
    elif damage == "zeroed tail":  # the size reached the disk, the data did not
        raw[-4096:] = bytes(4096)
    elif damage == "flipped byte":
        raw[len(raw) // 2] ^= 0x01
    else:
        raw = raw[:400]
    pool_file.write_bytes(bytes(raw))
    Spool(root)
    assert not _final_path(root, ds).exists()
    assert Spool(root).study_uids_on_disk() == []
    assert list((root / POOL_DIR).iterdir()) == []


def test_a_pool_file_identical_to_its_final_file_is_dropped(tmp_path):
    root = tmp_path / "spool"
    ds = make_instance(pydicom.uid.generate_uid())
    pool_file = _crash_before_rename(root, ds, tmp_path)
    saved = pool_file.read_bytes()
    Spool(root)  # promoted
    final = _final_path(root, ds)
    before = final.stat()
    # As if the rename had reached the disk but the pool name's removal had not.
    (root / POOL_DIR / "again.pool").write_bytes(saved)
    Spool(root)
    assert list((root / POOL_DIR).iterdir()) == []
    after = final.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_complete_pool_file_replaces_the_older_version_at_its_name(tmp_path):
    root = tmp_path / "spool"
    study = pydicom.uid.generate_uid()
    old = make_instance(study, seed=1)
    new = make_instance(study, old.SeriesInstanceUID, old.SOPInstanceUID, seed=2)
    assert _store(Spool(root), old).outcome is StoreOutcome.NEW
    _crash_before_rename(root, new, tmp_path)  # the newer version, maybe acknowledged
    assert dataset_bytes(_final_path(root, old)) == encode_wire(old)
    Spool(root)
    assert dataset_bytes(_final_path(root, old)) == encode_wire(new)


def test_a_duplicate_writes_no_pool_file(tmp_path):
    """The duplicate check runs before the write: an identical copy never takes a pool file."""
    spool = Spool(tmp_path / "spool")
    ds = make_instance(pydicom.uid.generate_uid())
    assert _store(spool, ds).outcome is StoreOutcome.NEW
    assert spool.pool is not None
    ready = len(spool.pool)
    names = sorted(p.name for p in spool.pool_dir.iterdir())
    assert _store(spool, ds).outcome is StoreOutcome.DUPLICATE
    assert len(spool.pool) == ready
    assert sorted(p.name for p in spool.pool_dir.iterdir()) == names
    assert _written_pool_files(spool.root) == []


def test_concurrent_stores_each_write_their_own_pool_file(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "spool")
    used: list[Path] = []
    lock = threading.Lock()
    real = spool_module.write_pooled

    def recording(pool, parts):  # type: ignore[no-untyped-def]
        path, size = real(pool, parts)
        with lock:
            used.append(path)
        return path, size

    monkeypatch.setattr(spool_module, "write_pooled", recording)
    study = pydicom.uid.generate_uid()
    series = pydicom.uid.generate_uid()
    datasets = [
        [make_instance(study, series, seed=10 * i + j) for j in range(12)] for i in range(8)
    ]
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def sender(i: int) -> None:
        barrier.wait()
        try:
            for ds in datasets[i]:
                assert _store(spool, ds).outcome is StoreOutcome.NEW
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(used) == len(set(used)) == 96  # 96 stores, 96 different pool files
    for ds in (d for group in datasets for d in group):
        assert dataset_bytes(_final_path(spool.root, ds)) == encode_wire(ds)
    assert _written_pool_files(spool.root) == []
    assert spool.pool is not None
    assert eventually(lambda: len(spool.pool or []) >= spool.pool.low_water)  # refilled


def test_one_data_flush_and_no_directory_flush_per_instance_in_an_existing_series(
    tmp_path, monkeypatch
):
    spool = Spool(tmp_path / "spool")
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    _store(spool, make_instance(study, series))  # creates the folders and fills the pool
    datasyncs: list[int] = []
    fsyncs: list[int] = []
    real_datasync, real_fsync = os.fdatasync, os.fsync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (datasyncs.append(fd), real_datasync(fd))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    for seed in range(5):
        _store(spool, make_instance(study, series, seed=seed))
    assert (len(datasyncs), len(fsyncs)) == (5, 0)


def test_replacing_an_instance_flushes_the_pool_folder_before_the_rename(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "spool")
    old = make_instance(pydicom.uid.generate_uid(), seed=1)
    new = make_instance(old.StudyInstanceUID, old.SeriesInstanceUID, old.SOPInstanceUID, seed=2)
    _store(spool, old)
    events: list[tuple[str, Path]] = []
    real_flush, real_rename = spool_module.fsync_dir, spool_module.rename_pooled
    monkeypatch.setattr(
        spool_module, "fsync_dir", lambda p: (events.append(("flush", p)), real_flush(p))[1]
    )
    monkeypatch.setattr(
        spool_module,
        "rename_pooled",
        lambda a, b: (events.append(("rename", b)), real_rename(a, b))[1],
    )
    assert _store(spool, new).outcome is StoreOutcome.REPLACED
    assert events == [("flush", spool.pool_dir), ("rename", _final_path(spool.root, old))]


def test_a_process_other_than_the_listener_writes_through_incoming_with_two_flushes(tmp_path):
    Spool(tmp_path / "spool")  # the listener's folders
    other = Spool(tmp_path / "spool", clean_incoming=False)  # e.g. a worker retrieving
    ds = make_instance(pydicom.uid.generate_uid())
    path = _store(other, ds).instance.path
    assert other.pool is None and not (tmp_path / "spool" / POOL_DIR).exists()
    assert "PrivateInformationCreatorUID" not in pydicom.filereader.read_file_meta_info(path)
    assert dataset_bytes(path) == encode_wire(ds)
    assert not any(other.incoming.iterdir())


def _listener_process(spool: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    args = ["listen", "--spool", str(spool), "--port", str(port), "--reserve-mb", "0"]
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "dicom_io", *args],
            env=dict(os.environ, TCP_NODELAY="1", PYTHONPATH=str(REPO)),
            stdout=out,
            stderr=out,
        )
    assert eventually(lambda: b'"listening"' in log.read_bytes(), 30), log.read_text()
    return process


@pytest.mark.dcmtk
def test_sigkill_during_a_storescu_burst_loses_no_acknowledged_instance(tmp_path):
    need_dcmtk("storescu")
    spool, port = tmp_path / "spool", free_port()
    study = pydicom.uid.generate_uid()
    series = pydicom.uid.generate_uid()
    sources = [
        write_instance(make_instance(study, series, rows=512, cols=512, seed=i), tmp_path / "send")
        for i in range(60)
    ]
    listener = _listener_process(spool, port, tmp_path / "listener.log")
    sender = subprocess.Popen(
        ["/usr/bin/storescu", "-v", "-aec", "PNEUMO", "127.0.0.1", str(port), *map(str, sources)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, TCP_NODELAY="1"),
    )
    try:
        assert eventually(lambda: len(list(spool.glob("*/*/*.dcm"))) >= 15, 60)
        listener.send_signal(signal.SIGKILL)
        listener.wait(10)
        output, _ = sender.communicate(timeout=60)
    finally:
        for process in (listener, sender):
            if process.poll() is None:
                process.kill()
                process.wait()
    acknowledged: list[str] = []
    sending = None
    for line in output.splitlines():
        if line.startswith("I: Sending file: "):
            sending = line[len("I: Sending file: ") :]
        elif "Received Store Response (Success)" in line and sending is not None:
            acknowledged.append(sending)
    assert 10 <= len(acknowledged) < len(sources), output[-2000:]  # killed mid-burst

    restarted = _listener_process(spool, port, tmp_path / "listener-2.log")
    try:
        on_disk = {
            i.sop_instance_uid: i.path for i in Spool(spool, clean_incoming=False).scan_study(study)
        }
        for source in acknowledged:
            sent = pydicom.dcmread(source)
            kept = on_disk[str(sent.SOPInstanceUID)]
            assert pydicom.dcmread(kept).PixelData == sent.PixelData
        assert _written_pool_files(spool) == []  # nothing torn or unpromoted left
    finally:
        restarted.terminate()
        restarted.wait(20)


# --- the commit check's format ----------------------------------------------------------

_META_BODY = 128 + 4 + 12  # preamble, "DICM", (0002,0000) UL element with its value


def _check_parts(raw: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """A checked file split as written: head, check elements, check value, data set."""
    (group_length,) = struct.unpack_from("<I", raw, _META_BODY - 4)
    data_start = _META_BODY + group_length
    creator_tag = raw.rindex(struct.pack("<HH2s", 0x0002, 0x0100, b"UI"), 0, data_start)
    value_start = raw.index(struct.pack("<HH2s2x", 0x0002, 0x0102, b"OB"), creator_tag) + 12
    return (
        raw[:creator_tag],
        raw[creator_tag:value_start],
        raw[value_start:data_start],
        raw[data_start:],
    )


def _rewrite_with_crc32_check(path: Path) -> None:
    """Rewrite a checked file as the spool wrote it before XXH3: length and CRC-32 (12 bytes)."""
    from dicom_io.spool import CRC32_CHECK_CREATOR_UID

    written, new_elements, new_value, data = _check_parts(path.read_bytes())
    creator = CRC32_CHECK_CREATOR_UID.encode() + b"\0" * (len(CRC32_CHECK_CREATOR_UID) % 2)
    elements = struct.pack("<HH2sH", 0x0002, 0x0100, b"UI", len(creator)) + creator
    elements += struct.pack("<HH2s2xI", 0x0002, 0x0102, b"OB", 12)
    head = bytearray(written)
    (group_length,) = struct.unpack_from("<I", head, _META_BODY - 4)
    group_length += len(elements) + 12 - len(new_elements) - len(new_value)
    struct.pack_into("<I", head, _META_BODY - 4, group_length)
    crc = zlib.crc32(data, zlib.crc32(head))
    path.write_bytes(bytes(head) + elements + struct.pack("<QI", len(data), crc) + data)


def test_the_commit_check_is_the_length_and_xxh3_64_of_the_rest_of_the_file(tmp_path):
    import xxhash

    root = tmp_path / "spool"
    ds = make_instance(pydicom.uid.generate_uid(), rows=64, cols=64)
    _crash_before_rename(root, ds, tmp_path)
    Spool(root)
    head, elements, value, data = _check_parts(_final_path(root, ds).read_bytes())
    assert COMMIT_CHECK_CREATOR_UID.encode() in elements
    length, digest = struct.unpack("<QQ", value)
    assert length == len(data) and data == encode_wire(ds)
    assert digest == xxhash.xxh3_64_intdigest(head + data)


@pytest.mark.parametrize("damage", [None, "flipped byte"])
def test_a_pool_file_with_the_earlier_crc32_check_is_verified_as_before(tmp_path, damage):
    """Pool files written before the XXH3 check (an upgrade after a crash) still recover."""
    from dicom_io.spool import CRC32_CHECK_CREATOR_UID

    root = tmp_path / "spool"
    ds = make_instance(pydicom.uid.generate_uid(), rows=256, cols=256)
    pool_file = _crash_before_rename(root, ds, tmp_path)
    _rewrite_with_crc32_check(pool_file)
    if damage:
        raw = bytearray(pool_file.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        pool_file.write_bytes(bytes(raw))
    Spool(root)
    final = _final_path(root, ds)
    assert list((root / POOL_DIR).iterdir()) == []
    if damage:
        assert not final.exists()
        return
    assert dataset_bytes(final) == encode_wire(ds)
    meta = pydicom.filereader.read_file_meta_info(final)
    assert meta.PrivateInformationCreatorUID == CRC32_CHECK_CREATOR_UID
    assert pydicom.dcmread(final).PixelData == ds.PixelData
