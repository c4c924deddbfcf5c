"""Durable, private file writes: temp file, fsync, rename, fsync directory; or one flush.

A file written by :func:`write_atomic` (or :func:`write_temp` and
:func:`commit`) is either absent or complete after a crash at any point:

1. the bytes go to a temporary file in a folder on the same file system,
   created ``0600`` (PHI at rest: only the service user may read it);
2. the file is ``fsync``-ed, so data and inode are on stable storage before
   its name can become visible;
3. it is renamed over the final name (``rename(2)`` is atomic on POSIX);
4. the final folder is ``fsync``-ed, so the new directory entry survives a
   power loss too (and so does every folder this call had to create).

Folders created here are ``0700``. The spool, the study-assembly journal and
the result SR/SC files all go through these functions; only the listener's
spool writes use the one-flush commit below.

Group commit (step 4): renames into one folder from several threads at once
(several associations receiving the same study) share directory flushes. A
flush started after a rename covers it, so a caller whose rename is covered
by a flush that started after it returns when that flush ends, instead of
queueing a flush of its own; nobody returns before a flush that started after
its own rename has succeeded (:func:`sync_dir`).

One-flush commit (:class:`FilePool`, :func:`write_pooled`, :func:`rename_pooled`):
for a writer that answers someone after every file (the C-STORE receive path),
the directory flush of step 4 is pure latency. A pool holds empty files whose
names are already durable (a batch is created, then its folder is flushed
once). A write takes one, writes the bytes, ``fdatasync``-s it (data and size:
the name is durable already) and renames it to its final name *without*
flushing a directory. After a crash the instance is either under its final
name or still under its pool name, complete; the caller must be able to tell
a complete pool file from a torn one (the spool writes a checksum into the
file) and promote complete ones at start-up. Folders created for the final
name are flushed *before* the rename, so the rename never moves a durable
name into a folder that might not survive.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import threading
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "POOL_SUFFIX",
    "FilePool",
    "commit",
    "fsync_dir",
    "make_private_dirs",
    "remove_unused_pool_files",
    "rename_pooled",
    "sync_dir",
    "write_atomic",
    "write_part10",
    "write_pooled",
    "write_temp",
]

log = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700
POOL_SUFFIX = ".pool"  # the names of a FilePool's files

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


class FilePool:
    """Empty 0600 files in ``folder`` whose names are already durable, handed out one at a time.

    Thread-safe: each :meth:`take` returns a file nobody else in this process
    holds. Files are created ``batch`` at a time with one flush of the folder
    for the batch; when fewer than ``low_water`` are left a background thread
    creates the next batch, and a :meth:`take` finding the pool empty creates
    one itself. Only files this object created are handed out: files found in
    the folder (a previous run's) are the owner's to recover, never reused.
    Each name starts with the creating process's id (``<pid>-<random>.pool``),
    so the files a process that died never used can be told apart and removed
    (:func:`remove_unused_pool_files`) while other processes share the folder.
    """

    def __init__(self, folder: Path, *, batch: int = 64, low_water: int = 16) -> None:
        if batch < 1 or not 0 <= low_water < batch:
            raise ValueError("FilePool needs batch >= 1 and 0 <= low_water < batch")
        self.folder = Path(folder)
        self.batch = batch
        self.low_water = low_water
        self._free: deque[Path] = deque()
        self._lock = threading.Lock()
        self._fill_lock = threading.Lock()  # one batch at a time
        self._refilling = False

    def __len__(self) -> int:
        """Files ready to be taken."""
        with self._lock:
            return len(self._free)

    def take(self) -> Path:
        """An empty file with a durable name, for this caller alone.

        Raises:
            OSError: the pool was empty and a batch could not be created.
        """
        while True:
            with self._lock:
                if self._free:
                    path = self._free.popleft()
                    if len(self._free) < self.low_water and not self._refilling:
                        self._refilling = True
                        threading.Thread(
                            target=self._refill, name="pneumo-file-pool", daemon=True
                        ).start()
                    return path
            self.fill(only_if_empty=True)

    def fill(self, *, only_if_empty: bool = False) -> int:
        """Create a batch of files, flush the folder once, add them; return how many.

        ``only_if_empty`` does nothing when files are ready (another thread
        filled the pool while this one waited).

        Raises:
            OSError: the folder or a file cannot be created or flushed; files
                created by this call are removed again.
        """
        with self._fill_lock:
            if only_if_empty and len(self):
                return 0
            created_dirs = make_private_dirs(self.folder)
            names: list[Path] = []
            try:
                for _ in range(self.batch):
                    path = self.folder / f"{os.getpid()}-{uuid.uuid4().hex}{POOL_SUFFIX}"
                    fd = os.open(
                        path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE
                    )
                    os.close(fd)
                    names.append(path)
                fsync_dir(self.folder)  # the whole batch's names, one flush
                for d in created_dirs:
                    fsync_dir(d.parent)
            except BaseException:
                for path in names:
                    path.unlink(missing_ok=True)
                raise
            with self._lock:
                self._free.extend(names)
            return len(names)

    def discard(self, path: Path) -> None:
        """Remove a taken file whose content is unknown (a failed write or flush).

        Not flushed: should the name survive a crash, the owner's start-up
        recovery judges the file like any other pool file.
        """
        Path(path).unlink(missing_ok=True)

    def forget(self) -> None:
        """Drop every name held (the folder was emptied or replaced under us)."""
        with self._lock:
            self._free.clear()

    def _refill(self) -> None:
        try:
            if len(self) < self.low_water:
                self.fill()
        except OSError as exc:  # the next take() on an empty pool fills (and raises) itself
            log.warning("refilling the file pool failed (%s)", exc.strerror)
        finally:
            with self._lock:
                self._refilling = False


def remove_unused_pool_files(folder: Path, pid: int) -> int:
    """Remove the empty pool files that process ``pid``, now ended, created; return how many.

    A process that dies leaves the files of its :class:`FilePool` it never
    wrote. An empty file holds nothing that was acknowledged, so it goes; a
    written one (an instance whose rename the death may have interrupted)
    stays for the owner's start-up recovery to judge. Call it only once
    ``pid`` has been reaped: a live process may be writing its files.

    Raises:
        OSError: the folder cannot be listed or flushed, or a file removed.
    """
    prefix = f"{pid}-"
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(POOL_SUFFIX)):
            continue
        if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_size == 0:
            os.unlink(entry.path)
            removed += 1
    if removed:
        fsync_dir(Path(folder))
    return removed


def write_pooled(pool: FilePool, parts: Sequence[Chunk]) -> tuple[Path, int]:
    """Write ``parts`` into an empty file from ``pool`` and ``fdatasync`` it.

    Returns the file's (pool) path and the number of bytes written. The name
    is durable already, so ``fdatasync`` (data and size) is the only flush.
    The caller renames the file with :func:`rename_pooled` or removes it
    with :meth:`FilePool.discard`. A failed write or flush removes the file.
    Names the pool holds that vanished (the folder was emptied) are dropped
    and a fresh batch is tried once.

    Raises:
        OSError: no file could be taken, written or flushed (disk full, I/O error).
    """
    stale_retries = 1
    while True:
        path = pool.take()
        try:
            # Never O_CREAT: a name created here would not be durable.
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            pool.forget()
            if stale_retries == 0:
                raise
            stale_retries -= 1
            continue
        try:
            if os.fstat(fd).st_size:  # written by someone else: not ours to touch
                continue
            try:
                size = _write_all(fd, parts)
                os.fdatasync(fd)
            except BaseException:
                pool.discard(path)
                raise
            return path, size
        finally:
            os.close(fd)


def rename_pooled(path: Path, final: Path) -> None:
    """Rename a file written by :func:`write_pooled` to ``final``, without a directory flush.

    Folders missing above ``final`` are created 0700 and their entries
    flushed *before* the rename, so the file only ever moves into a folder
    that survives a crash. The rename itself is not flushed: until it is
    durable the file's pool name is, and the owner's start-up recovery
    promotes it (the write must be recognisable as complete).

    Raises:
        OSError: a folder cannot be created or flushed, or the rename fails.
    """
    for d in make_private_dirs(final.parent):
        fsync_dir(d.parent)
    os.replace(path, final)


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
