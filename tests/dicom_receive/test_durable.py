"""The one atomic-write helper (dicom_io.durable): complete or absent, private, durable."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest

from dicom_io import durable
from dicom_io.durable import write_atomic, write_part10
from dicom_io.spool import Spool
from tests.dicom_receive.dicom_receive_helpers import (
    dataset_bytes,
    encode_wire,
    eventually,
    make_instance,
)

REPO = Path(__file__).resolve().parents[2]


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


# --- the one-flush commit: FilePool, write_pooled, rename_pooled -----------------


def _spy(monkeypatch, owner, name: str) -> list[object]:  # type: ignore[no-untyped-def]
    """Record the first argument of each call to ``owner.name``, then call the real one."""
    calls: list[object] = []
    real = getattr(owner, name)

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args[0] if args else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


def test_file_pool_hands_out_empty_private_files_and_refills_in_the_background(tmp_path):
    pool = durable.FilePool(tmp_path / "pool", batch=8, low_water=3)
    assert len(pool) == 0 and not (tmp_path / "pool").exists()  # nothing until needed
    taken = [pool.take() for _ in range(6)]  # the first take fills a batch itself
    assert len(set(taken)) == 6
    for path in taken:
        assert path.parent == tmp_path / "pool" and path.name.endswith(durable.POOL_SUFFIX)
        assert path.stat().st_size == 0 and _mode(path) == 0o600
    assert _mode(tmp_path / "pool") == 0o700
    # 2 left, below the low-water mark of 3: a background thread adds a batch.
    assert eventually(lambda: len(pool) == 2 + 8)
    assert len(list((tmp_path / "pool").iterdir())) == 6 + 10


def test_unused_pool_files_of_an_ended_process_are_removed_and_nothing_else(tmp_path):
    folder = tmp_path / "pool"
    ours = durable.FilePool(folder, batch=4, low_water=0)
    ours.fill()
    used = ours.take()
    used.write_bytes(b"written, not yet renamed")
    # Another process's pool in the same folder: a real child fills it and exits.
    code = (
        "import sys; from pathlib import Path; from dicom_io import durable; "
        "durable.FilePool(Path(sys.argv[1]), batch=3, low_water=0).fill()"
    )
    subprocess.run([sys.executable, "-c", code, str(folder)], cwd=REPO, check=True)
    mine = {p.name for p in folder.iterdir() if p.name.startswith(f"{os.getpid()}-")}
    theirs = set(p.name for p in folder.iterdir()) - mine
    assert len(mine) == 4 and len(theirs) == 3  # names say which process made them
    (folder / "other.part").write_bytes(b"")  # not a pool file
    dead = int(next(iter(theirs)).split("-", 1)[0])

    assert durable.remove_unused_pool_files(folder, dead) == 3
    assert {p.name for p in folder.iterdir()} == mine | {"other.part"}
    # Only empty files go: the written one stays for start-up recovery.
    assert durable.remove_unused_pool_files(folder, os.getpid()) == 3
    assert sorted(folder.iterdir()) == sorted([used, folder / "other.part"])
    assert durable.remove_unused_pool_files(tmp_path / "missing", dead) == 0


def test_file_pool_batches_share_one_folder_flush(tmp_path, monkeypatch):
    flushed = _spy(monkeypatch, durable, "fsync_dir")
    pool = durable.FilePool(tmp_path / "pool", batch=16, low_water=0)
    assert pool.fill() == 16
    assert flushed == [tmp_path / "pool", tmp_path]  # the batch, then the new folder's entry
    flushed.clear()
    assert pool.fill() == 16
    assert flushed == [tmp_path / "pool"]


def test_concurrent_takes_never_share_a_file(tmp_path):
    pool = durable.FilePool(tmp_path / "pool", batch=16, low_water=4)
    taken: list[list[Path]] = [[] for _ in range(8)]

    def take(i: int) -> None:
        for _ in range(25):
            taken[i].append(pool.take())

    assert _concurrently(8, take) == [None] * 8
    everything = [p for paths in taken for p in paths]
    assert len(everything) == len(set(everything)) == 200
    assert all(p.exists() for p in everything)


def test_a_pooled_write_takes_one_data_flush_and_its_rename_none(tmp_path, monkeypatch):
    pool = durable.FilePool(tmp_path / "pool")
    pool.fill()
    (tmp_path / "series").mkdir()
    datasyncs = _spy(monkeypatch, durable.os, "fdatasync")
    fsyncs = _spy(monkeypatch, durable.os, "fsync")
    path, size = durable.write_pooled(pool, [b"head", memoryview(b"-data")])
    durable.rename_pooled(path, tmp_path / "series" / "x.dcm")
    assert size == 9 and (tmp_path / "series" / "x.dcm").read_bytes() == b"head-data"
    assert len(datasyncs) == 1 and fsyncs == []
    assert not path.exists()


def test_rename_pooled_flushes_new_folders_before_the_rename(tmp_path, monkeypatch):
    pool = durable.FilePool(tmp_path / "pool")
    path, _size = durable.write_pooled(pool, [b"x"])
    events: list[tuple[str, Path]] = []
    real_fsync_dir, real_replace = durable.fsync_dir, durable.os.replace
    monkeypatch.setattr(
        durable, "fsync_dir", lambda p: (events.append(("flush", Path(p))), real_fsync_dir(p))
    )
    monkeypatch.setattr(
        durable.os, "replace", lambda a, b: (events.append(("rename", Path(b))), real_replace(a, b))
    )
    final = tmp_path / "study" / "series" / "x.dcm"
    durable.rename_pooled(path, final)
    assert events == [
        ("flush", tmp_path),  # the study folder's entry
        ("flush", tmp_path / "study"),  # the series folder's entry
        ("rename", final),  # only then, and nothing flushed after it
    ]
    assert final.read_bytes() == b"x"


def test_a_failed_pooled_flush_removes_the_file(tmp_path, monkeypatch):
    pool = durable.FilePool(tmp_path / "pool", batch=4, low_water=0)
    pool.fill()

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(durable.os, "fdatasync", failing)
    with pytest.raises(OSError):
        durable.write_pooled(pool, [b"payload"])
    # The file of unknown content is gone, not back in the pool; the others are untouched.
    assert len(pool) == 3 and len(list((tmp_path / "pool").iterdir())) == 3
    assert all(p.stat().st_size == 0 for p in (tmp_path / "pool").iterdir())


def test_names_that_vanished_are_dropped_and_a_fresh_batch_is_used(tmp_path):
    pool = durable.FilePool(tmp_path / "pool", batch=4, low_water=0)
    pool.fill()
    shutil.rmtree(tmp_path / "pool")  # e.g. an operator emptied the folder
    path, _size = durable.write_pooled(pool, [b"payload"])
    assert path.read_bytes() == b"payload" and path.parent == tmp_path / "pool"
