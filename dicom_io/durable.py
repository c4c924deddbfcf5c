"""Durable, private file writes: the one "temp file, fsync, rename, fsync directory" helper.

A file written here is either absent or complete after a crash at any point:

1. the bytes go to a temporary file in a folder on the same file system,
   created ``0600`` (PHI at rest: only the service user may read it);
2. the file is ``fsync``-ed, so data and inode are on stable storage before
   its name can become visible;
3. it is renamed over the final name (``rename(2)`` is atomic on POSIX);
4. the final folder is ``fsync``-ed, so the new directory entry survives a
   power loss too (and so does every folder this call had to create).

Folders created here are ``0700``. The spool, the study-assembly journal and
the result SR/SC files all go through these functions.

Group commit (step 4): renames into one folder from several threads at once
(several associations receiving the same study) share directory flushes. A
flush started after a rename covers it, so a caller whose rename is covered
by a flush that started after it returns when that flush ends, instead of
queueing a flush of its own; nobody returns before a flush that started after
its own rename has succeeded (:func:`sync_dir`).
"""

from __future__ import annotations

import errno
import io
import os
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "commit",
    "fsync_dir",
    "make_private_dirs",
    "sync_dir",
    "write_atomic",
    "write_part10",
    "write_temp",
]

FILE_MODE = 0o600
DIR_MODE = 0o700

Chunk = bytes | bytearray | memoryview


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries to stable storage.

    Raises:
        OSError: the directory cannot be opened or flushed.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _FolderFlushes:
    """Flush bookkeeping of one folder: tickets handed out, tickets made durable."""

    requested: int = 0
    flushed: int = 0
    running: bool = False
    users: int = 0


_flushes: dict[str, _FolderFlushes] = {}
_flushes_changed = threading.Condition()


def sync_dir(path: Path) -> None:
    """Make every change already made in folder ``path`` durable, sharing flushes (group commit).

    Call it after the rename (or creation) it must make durable. Concurrent
    callers for the same folder need one :func:`fsync_dir` between them when
    it started after all their changes; a caller never returns before a flush
    that started after its call has succeeded. A failed flush raises in the
    caller that ran it; the callers it would have covered flush for themselves.

    Raises:
        OSError: the folder cannot be opened or flushed.
    """
    key = os.fspath(path)
    with _flushes_changed:
        state = _flushes.setdefault(key, _FolderFlushes())
        state.users += 1
        state.requested += 1
        ticket = state.requested
    try:
        while True:
            with _flushes_changed:
                while state.running and state.flushed < ticket:
                    _flushes_changed.wait()
                if state.flushed >= ticket:
                    return
                state.running = True
                covered = state.requested  # every caller so far changed the folder before this
            done = False
            try:
                fsync_dir(path)
                done = True
            finally:
                with _flushes_changed:
                    state.running = False
                    if done:
                        state.flushed = max(state.flushed, covered)
                    _flushes_changed.notify_all()
    finally:
        with _flushes_changed:
            state.users -= 1
            if state.users == 0 and _flushes.get(key) is state:
                del _flushes[key]


def make_private_dirs(path: Path) -> list[Path]:
    """Create ``path`` and missing parents with mode 0700; return those created, outermost first.

    Existing folders keep their mode. The caller makes the new entries durable
    (:func:`commit` does, for the folders it creates).

    Raises:
        OSError: a folder cannot be created.
    """
    missing: list[Path] = []
    current = Path(path)
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    created: list[Path] = []
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
        except FileExistsError:  # another thread made it first
            continue
        os.chmod(d, DIR_MODE)  # mkdir's mode is filtered by the umask
        created.append(d)
    return created


def _write_all(fd: int, parts: Sequence[Chunk]) -> int:
    """Write ``parts`` to ``fd`` with as few system calls as possible; return the size."""
    pending = [memoryview(p).cast("B") for p in parts if len(p)]
    total = sum(len(p) for p in pending)
    while pending:
        written = os.writev(fd, pending)
        if written <= 0:
            raise OSError(errno.ENOSPC, "no progress writing the file")
        while pending and written >= len(pending[0]):  # drop what this call wrote
            written -= len(pending[0])
            pending.pop(0)
        if pending and written:
            pending[0] = pending[0][written:]
    return total


def write_temp(folder: Path, parts: Sequence[Chunk]) -> tuple[Path, int]:
    """Write ``parts`` to a new 0600 temporary file in ``folder`` and ``fsync`` it.

    Returns the temporary path and the number of bytes written. The caller
    either :func:`commit`-s it or deletes it; a failed write leaves nothing.

    Raises:
        OSError: the file cannot be created, written or flushed (disk full, I/O error).
    """
    tmp = Path(folder) / f".{uuid.uuid4().hex}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            size = _write_all(fd, parts)
            # Data and inode on stable storage before the rename can make the
            # name visible (fdatasync measured no faster).
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, size


def commit(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` over ``final`` and make the rename durable.

    ``tmp`` must be on the same file system as ``final`` (rename is atomic
    only there). Missing folders above ``final`` are created 0700 and their
    own entries flushed as well.

    Raises:
        OSError: the folder cannot be created, or the rename or a flush fails.
    """
    created = make_private_dirs(final.parent)
    os.replace(tmp, final)
    sync_dir(final.parent)
    for d in created:
        fsync_dir(d.parent)


def write_atomic(path: Path, data: Chunk | Sequence[Chunk]) -> Path:
    """Write ``data`` to ``path`` durably and atomically (0600; new folders 0700).

    A reader sees either the previous file or the complete new one, never a part.

    Raises:
        OSError: writing, flushing or renaming failed; ``path`` is then unchanged.
    """
    path = Path(path)
    parts: Sequence[Chunk] = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    created = make_private_dirs(path.parent)
    tmp, _size = write_temp(path.parent, parts)
    try:
        commit(tmp, path)
        for d in created:  # the new folders' own entries, as commit() does for its own
            fsync_dir(d.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_part10(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (PS3.10 §7.1) at ``path``, durably and atomically.

    The data set is encoded in memory first (``enforce_file_format=True``:
    preamble, ``DICM`` and File Meta Information are written, and pydicom
    refuses a data set it cannot encode as a conformant file), then written
    with :func:`write_atomic`. Returns ``path``.

    Raises:
        ValueError: pydicom cannot encode ``ds`` as a Part 10 file (e.g. no
            transfer syntax, or missing SOP Class/Instance UID).
        OSError: writing, flushing or renaming failed; ``path`` is then unchanged.
    """
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return write_atomic(Path(path), buffer.getbuffer())
