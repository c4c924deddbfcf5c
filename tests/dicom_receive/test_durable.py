"""The one atomic-write helper (dicom_io.durable): complete or absent, private, durable."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pydicom
import pytest

from dicom_io import durable
from dicom_io.durable import write_atomic, write_part10
from dicom_io.spool import Spool
from tests.dicom_receive.dicom_receive_helpers import dataset_bytes, encode_wire, make_instance


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_atomic_creates_private_files_and_folders(tmp_path):
    old = os.umask(0o022)  # a permissive umask must not widen the modes
    try:
        target = tmp_path / "a" / "b" / "file.bin"
        assert write_atomic(target, b"payload") == target
    finally:
        os.umask(old)
    assert target.read_bytes() == b"payload"
    assert _mode(target) == 0o600
    assert _mode(tmp_path / "a") == 0o700 and _mode(tmp_path / "a" / "b") == 0o700
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]  # no temp file left


def test_rename_and_new_folders_are_flushed(tmp_path, monkeypatch):
    flushed: list[Path] = []
    real = durable.fsync_dir
    monkeypatch.setattr(durable, "fsync_dir", lambda p: (flushed.append(Path(p)), real(p)))
    write_atomic(tmp_path / "new" / "f", b"x")
    # The folder holding the new name, and the parent of the folder created for it.
    assert flushed == [tmp_path / "new", tmp_path]


def test_failed_write_leaves_previous_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "f"
    write_atomic(target, b"old")

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_write_part10_round_trips_and_replaces(tmp_path):
    ds = make_instance(pydicom.uid.generate_uid())
    path = tmp_path / "results" / "sr.dcm"
    assert write_part10(ds, path) == path
    back = pydicom.dcmread(path)
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    ds.PatientID = "OTHER"
    write_part10(ds, path)
    assert pydicom.dcmread(path).PatientID == "OTHER"


def test_write_part10_refuses_an_unencodable_dataset(tmp_path):
    ds = make_instance(pydicom.uid.generate_uid())
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises((ValueError, AttributeError)):
        write_part10(ds, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


def test_partial_writes_are_continued(tmp_path, monkeypatch):
    """``writev`` may write less than asked (signals, huge buffers): the rest still lands."""
    real_writev = os.writev
    calls = []

    def short_writev(fd, buffers):
        calls.append(len(buffers))
        data = b"".join(bytes(b) for b in buffers)[:777]  # at most 777 bytes per call
        return real_writev(fd, [data])

    monkeypatch.setattr(durable.os, "writev", short_writev)
    spool = Spool(tmp_path / "spool")
    ds = make_instance(pydicom.uid.generate_uid(), rows=64, cols=64)
    wire = encode_wire(ds)
    result = spool.store(
        wire,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
    )
    assert len(calls) > 10
    assert result.instance.size == result.instance.path.stat().st_size
    assert dataset_bytes(result.instance.path) == wire
    assert _mode(result.instance.path) == 0o600
    assert _mode(result.instance.path.parent) == 0o700


def _timed_flushes(monkeypatch, fail_first: bool = False) -> list[tuple[float, float, bool]]:  # type: ignore[no-untyped-def]
    """Wrap the real directory flush: record (start, end, succeeded); slow it so callers overlap."""
    flushes: list[tuple[float, float, bool]] = []
    real = durable.fsync_dir
    lock = threading.Lock()

    def timed(path: Path) -> None:
        start = time.monotonic()
        time.sleep(0.02)
        with lock:
            failing = fail_first and not flushes
            if failing:
                flushes.append((start, time.monotonic(), False))
        if failing:
            raise OSError(5, "Input/output error")
        real(path)
        with lock:
            flushes.append((start, time.monotonic(), True))

    monkeypatch.setattr(durable, "fsync_dir", timed)
    return flushes


def _concurrently(count: int, work) -> list[BaseException | None]:  # type: ignore[no-untyped-def]
    barrier = threading.Barrier(count)
    outcomes: list[BaseException | None] = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        try:
            work(i)
        except BaseException as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return outcomes


def test_concurrent_renames_into_one_folder_share_flushes(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """Group commit: fewer flushes than renames, and each caller waited for a flush begun after it."""
    folder = tmp_path / "series"
    folder.mkdir()
    flushes = _timed_flushes(monkeypatch)
    calls: list[tuple[float, float]] = []
    lock = threading.Lock()

    def write(i: int) -> None:
        for j in range(5):
            start = time.monotonic()
            write_atomic(folder / f"{i}-{j}.dcm", f"{i}-{j}".encode())
            with lock:
                calls.append((start, time.monotonic()))

    assert _concurrently(8, write) == [None] * 8
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{i}-{j}.dcm" for i in range(8) for j in range(5)
    )
    assert all(
        (folder / f"{i}-{j}.dcm").read_bytes() == f"{i}-{j}".encode()
        for i in range(8)
        for j in range(5)
    )
    assert 1 <= len(flushes) < len(calls) == 40
    for called, returned in calls:  # durable: a flush that started after the rename ended before
        assert any(called <= start and end <= returned for start, end, ok in flushes if ok)


def test_a_failed_shared_flush_fails_only_its_caller(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """The callers a failed flush would have covered flush for themselves: one error, the rest durable."""
    folder = tmp_path / "series"
    folder.mkdir()
    flushes = _timed_flushes(monkeypatch, fail_first=True)
    outcomes = _concurrently(4, lambda i: write_atomic(folder / f"{i}.dcm", b"x"))
    assert [type(o) for o in outcomes if o is not None] == [OSError]
    assert sum(1 for _, _, ok in flushes if ok) >= 1
    # write_atomic removes nothing after the rename: the file is there, but its caller was told
    # the flush failed (the spool then answers the C-STORE with a failure).
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{i}.dcm" for i in range(4))
