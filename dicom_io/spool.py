"""The receive spool: received instances written durably, exactly as they arrived.

Layout (every path component a UID checked by :func:`dicom_io.uids.require_uid`)::

    <spool_dir>/<study_uid>/<series_uid>/<sop_instance_uid>.dcm
    <spool_dir>/.pool/       empty files with durable names, written and renamed
                             into place by the listener (same file system)
    <spool_dir>/.incoming/   temporary files of other writers (same file system)
    <spool_dir>/.state/      study assembly journal (see ``dicom_io.assembly``)
    <spool_dir>/.locks/      lock files: one SOP Instance UID is written by one
                             process at a time (receiving processes, retrieval)

None of ``.pool``, ``.incoming``, ``.state`` and ``.locks`` is a UID, so no scan, purge
or retention pass ever treats a file there as an instance.

A spooled file is a DICOM Part 10 file (PS3.10 §7.1): 128-byte preamble,
``DICM``, File Meta Information (group 0002) that we write, then the data set
bytes *exactly as received* in the negotiated transfer syntax. Nothing is
decoded and re-encoded, so a lossy or vendor-specific encoding is never altered.

Durability (:mod:`dicom_io.durable`): C-STORE Success may be answered only
once the instance is on stable storage (PS3.4 §B.2.3), because after Success
the sender may delete its copy. Files are 0600, folders 0700: the spool holds
PHI. Two commits, chosen by who opened the spool:

* The listener (``clean_incoming=True``) owns ``.pool``: one flush per
  instance. It takes an empty file whose name is already durable
  (:class:`dicom_io.durable.FilePool`), writes the Part 10 bytes with a
  *commit check* in the File Meta Information (below), ``fdatasync``-s it and
  renames it to its final name without flushing a directory. Folders created
  for it (a new study or series) are flushed before the rename.
* A listener's receiving processes (:mod:`dicom_io.receivers`) write through
  ``.pool`` the same way (``pooled=True``) without recovering it: their
  listener recovered it before starting them.
* Any other process (``clean_incoming=False``: a worker retrieving purged
  files from the PACS) writes a temporary file in ``.incoming``, ``fsync``-s
  it, renames it and ``fsync``-s the folder (:func:`dicom_io.durable.commit`).

Commit check: (0002,0100) Private Information Creator UID
:data:`COMMIT_CHECK_CREATOR_UID` with (0002,0102) Private Information
(PS3.10 §7.1) holding the data set's length (8 bytes) and the XXH3-64 hash
(8 bytes, both little endian; ``xxhash``) of every byte of the file except
that element pair. It lets start-up recovery tell a complete pool file from a
torn one (missing or zeroed blocks, a short file), the job CRCs do for
PostgreSQL's and SQLite's write-ahead logs; it is no defence against
deliberate changes. XXH3-64 costs 0.4 ms on an 8 MB instance where ``zlib``'s
CRC-32 costs 2 to 4 ms and SHA-256 5 ms. Files written before it (creator
:data:`CRC32_CHECK_CREATOR_UID`: length and CRC-32, 12 bytes) are still
verified as they were. Other readers skip these elements.

Recovery contract (the listener's constructor, before study assembly scans the
spool): a crash may leave a written pool file whose rename was not yet
durable. A pool file whose check verifies holds an instance that may have been
acknowledged, so it is promoted to the name its header gives (UIDs read as the
store path reads them), replacing a different file of that name: it is the
newest version, because replacing an existing instance first flushes
``.pool`` (no older pool file of that instance can then survive), and so does
a purge. A pool file identical to the file at its final name is removed. A
pool file that does not verify was never acknowledged and is removed, and so
are empty ones: files found at start-up are never reused, so a second
listener started on a live spool by mistake can make the first one's writes
fail, not mix two instances in one file. Then the folders are flushed.

A deflated data set (PS3.5 §A.5) is inflated in bounded steps to read its
header and refused (:attr:`RefusalKind.TOO_LARGE`) when it inflates beyond
``max_inflated_bytes``, so no deflate bomb reaches the spool or the worker.

Speed (see ``bench/ingest.py``): the flush to stable storage dominates a
small instance, so everything else on the path is kept to a minimum: the few
header UIDs are read from the received bytes in memory *before* anything is
written (a refused data set never touches the disk), the File Meta Information
is encoded directly (:mod:`dicom_io.part10`), and the file is written with one
``writev``.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import hashlib
import io
import logging
import mmap
import os
import shutil
import struct
import threading
import weakref
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import xxhash

from dicom_io.config import DEFAULT_MAX_INFLATED_BYTES
from dicom_io.durable import (
    POOL_SUFFIX,
    FilePool,
    commit,
    fsync_dir,
    make_private_dirs,
    rename_pooled,
    sync_dir,
    write_pooled,
    write_temp,
)
from dicom_io.part10 import (
    HeaderError,
    InflationLimitExceeded,
    encode_file_meta,
    read_received_header,
)
from dicom_io.uids import InvalidUIDError, is_valid_uid, require_uid

__all__ = [
    "COMMIT_CHECK_CREATOR_UID",
    "CRC32_CHECK_CREATOR_UID",
    "INCOMING_DIR",
    "LOCKS_DIR",
    "POOL_DIR",
    "STATE_DIR",
    "SUFFIX",
    "RefusalKind",
    "Spool",
    "SpoolRefusal",
    "SpoolWriteError",
    "SpooledInstance",
    "StoreOutcome",
    "StoreResult",
]

log = logging.getLogger(__name__)

INCOMING_DIR = ".incoming"
POOL_DIR = ".pool"
STATE_DIR = ".state"
LOCKS_DIR = ".locks"
_LOCK_BUCKETS = 64  # lock files; two UIDs share one with probability 1/64
SUFFIX = ".dcm"

_COPY_CHUNK = 1 << 20

# The commit check: (0002,0100) names the format of (0002,0102), which holds
# the data set length and a hash of the rest of the file (module docstring).
COMMIT_CHECK_CREATOR_UID = "2.25.319681666285258003595280127255065876575"  # XXH3-64
CRC32_CHECK_CREATOR_UID = "2.25.2063339640477718013287718078636376618"  # before: CRC-32


def _xxh3_64(head: memoryview | bytes, data: memoryview) -> int:
    digest = xxhash.xxh3_64(head)
    digest.update(data)
    return int(digest.intdigest())


def _crc32(head: memoryview | bytes, data: memoryview) -> int:
    return zlib.crc32(data, zlib.crc32(head))


@dataclass(frozen=True)
class _CheckFormat:
    """One layout of the commit check: its creator UID, value layout and hash."""

    creator_uid: str
    value: struct.Struct  # data set length, hash of the rest of the file
    digest: Callable[[memoryview | bytes, memoryview], int]
    elements: bytes = field(init=False)  # (0002,0100) and the header of (0002,0102)

    def __post_init__(self) -> None:
        creator = self.creator_uid.encode("ascii")
        creator += b"\x00" * (len(creator) % 2)  # UI padding (PS3.5 §6.2)
        elements = (
            struct.pack("<HH2sH", 0x0002, 0x0100, b"UI", len(creator))
            + creator
            + struct.pack("<HH2s2xI", 0x0002, 0x0102, b"OB", self.value.size)
        )
        object.__setattr__(self, "elements", elements)

    @property
    def length(self) -> int:
        return len(self.elements) + self.value.size


_CHECK = _CheckFormat(COMMIT_CHECK_CREATOR_UID, struct.Struct("<QQ"), _xxh3_64)
_CHECK_FORMATS = (_CHECK, _CheckFormat(CRC32_CHECK_CREATOR_UID, struct.Struct("<QI"), _crc32))
# Preamble and "DICM", then (0002,0000) File Meta Information Group Length, UL.
_GROUP_LENGTH_ELEMENT = struct.pack("<HH2sH", 0x0002, 0x0000, b"UL", 4)
_META_BODY = 128 + 4 + len(_GROUP_LENGTH_ELEMENT) + 4


@dataclass(frozen=True)
class SpooledInstance:
    """One instance durably written to the spool."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path
    size: int
    calling_aet: str
    received_at: datetime  # UTC


class StoreOutcome(enum.Enum):
    """What writing an instance did to the spool."""

    NEW = "new"
    DUPLICATE = "duplicate"  # same SOP Instance UID, identical bytes: no-op
    REPLACED = "replaced"  # same SOP Instance UID, different bytes: replaced


@dataclass(frozen=True)
class StoreResult:
    instance: SpooledInstance
    outcome: StoreOutcome
    # Number of Study Related Instances (0020,1208) when the sender supplied it.
    expected_count: int | None


class RefusalKind(enum.Enum):
    """Why a data set was refused; the listener maps each to a C-STORE status."""

    INVALID_UID = "invalid-uid"  # missing or not PS3.5 §9.1 UID grammar
    UID_MISMATCH = "uid-mismatch"  # data set UIDs differ from the C-STORE command
    UNREADABLE = "unreadable"  # header cannot be parsed
    TOO_LARGE = "too-large"  # a deflated data set inflates beyond the cap


class SpoolRefusal(Exception):
    """The data set cannot be accepted (bad or missing UIDs, unreadable header).

    The message is PHI-free by construction: it names attributes, never values.
    """

    def __init__(self, message: str, kind: RefusalKind = RefusalKind.INVALID_UID) -> None:
        super().__init__(message)
        self.kind = kind


class SpoolWriteError(Exception):
    """The instance could not be written durably (disk full, I/O error)."""


class _KeepPoolFile(Exception):
    """Recovery cannot judge a pool file; it stays where it is. The message names no value."""


class _ProcessLocks:
    """``flock`` on :data:`_LOCK_BUCKETS` lock files, shared by this process's threads.

    The lock files are opened on the first write and kept open (64
    descriptors, closed when the spool is collected). ``flock`` locks belong
    to an open file, not a thread, so the threads of one process share each
    bucket: the first to enter locks the
    file, the last to leave unlocks it. Threads with *the same* UID are kept
    apart by the spool's per-UID locks; these keep processes apart. The
    kernel releases a dead holder's locks.
    """

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._fds: dict[int, int] = {}
        self._opening = threading.Lock()
        self._holders = [0] * _LOCK_BUCKETS
        self._gates = [threading.Lock() for _ in range(_LOCK_BUCKETS)]
        weakref.finalize(self, _close_all, self._fds)

    def _open_all(self) -> None:
        with self._opening:
            for bucket in range(_LOCK_BUCKETS):
                if bucket not in self._fds:
                    self._fds[bucket] = os.open(
                        self._folder / f"{bucket:02x}.lock",
                        os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                        0o600,
                    )

    @contextmanager
    def hold(self, bucket: int) -> Iterator[None]:
        if len(self._fds) < _LOCK_BUCKETS:
            self._open_all()
        with self._gates[bucket]:
            if self._holders[bucket] == 0:
                fcntl.flock(self._fds[bucket], fcntl.LOCK_EX)  # waits for other processes
            self._holders[bucket] += 1
        try:
            yield
        finally:
            with self._gates[bucket]:
                self._holders[bucket] -= 1
                if self._holders[bucket] == 0:
                    fcntl.flock(self._fds[bucket], fcntl.LOCK_UN)


def _close_all(fds: dict[int, int]) -> None:
    for fd in fds.values():
        os.close(fd)


@contextmanager
def _buffer(dataset: bytes | bytearray | memoryview | io.BytesIO) -> Iterator[memoryview]:
    """A read-only byte view of a received data set, without copying it."""
    if isinstance(dataset, io.BytesIO):
        with dataset.getbuffer() as view:
            yield view
    else:
        with memoryview(dataset) as view:
            yield view


def _file_digest(path: Path) -> bytes:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_COPY_CHUNK):
            h.update(chunk)
    return h.digest()


def _with_commit_check(meta: bytes, data: memoryview) -> bytes:
    """``meta`` (from :func:`encode_file_meta`) with the commit check appended to group 0002.

    The group length is raised by the check's size; the hash covers the
    returned bytes before the check and then ``data``.
    """
    if meta[_META_BODY - 12 : _META_BODY - 4] != _GROUP_LENGTH_ELEMENT:
        raise ValueError("file meta does not start with its group length")
    (group_length,) = struct.unpack_from("<I", meta, _META_BODY - 4)
    head = (
        meta[: _META_BODY - 4] + struct.pack("<I", group_length + _CHECK.length) + meta[_META_BODY:]
    )
    return head + _CHECK.elements + _CHECK.value.pack(data.nbytes, _CHECK.digest(head, data))


def _checked_data_start(raw: memoryview) -> int | None:
    """Where the data set starts in a file written with a commit check, or None.

    None unless the file is exactly as written: preamble and prefix, a
    group length whose last elements are a check of a known format, a data
    set of the recorded length and a matching hash.
    """
    if raw.nbytes < _META_BODY or raw[128:132].tobytes() != b"DICM":
        return None
    if raw[_META_BODY - 12 : _META_BODY - 4] != _GROUP_LENGTH_ELEMENT:
        return None
    (group_length,) = struct.unpack_from("<I", raw, _META_BODY - 4)
    data_start = _META_BODY + group_length
    if data_start > raw.nbytes:
        return None
    for check in _CHECK_FORMATS:
        check_start = data_start - check.length
        if check_start < _META_BODY:
            continue
        if raw[check_start : check_start + len(check.elements)] != check.elements:
            continue
        length, recorded = check.value.unpack_from(raw, data_start - check.value.size)
        if raw.nbytes - data_start != length:
            return None
        with raw[:check_start] as head, raw[data_start:] as data:
            actual = check.digest(head, data)
        return data_start if actual == recorded else None
    return None


class Spool:
    """Writes received instances under ``root`` and answers where they live.

    Raises:
        OSError: (constructor) the spool folders cannot be created.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
        clean_incoming: bool = True,
        pooled: bool | None = None,
    ) -> None:
        """Open (and create, 0700) the spool at ``root``.

        ``clean_incoming`` marks the owner of the spool's write folders: only
        the listener may pass True. It removes temporary files a crash left
        behind, recovers ``.pool`` (module docstring: promotes complete pool
        files, removes the rest) and then writes with the one-flush commit
        through a pool of its own. Another process opening the spool while a
        listener runs (``pneumo purge``, a worker retrieving from the PACS)
        passes False, or it would delete or promote the listener's writes in
        progress; it writes with the two-flush commit in ``.incoming``.
        ``pooled`` (default: ``clean_incoming``) writes through ``.pool``
        without recovering it: a listener's receiving processes, started after
        their listener recovered the pool.

        Raises:
            OSError: a spool folder cannot be created, or recovery cannot
                read, rename, remove or flush a file.
        """
        self.root = Path(root)
        self.incoming = self.root / INCOMING_DIR
        self.pool_dir = self.root / POOL_DIR
        self.state_dir = self.root / STATE_DIR
        self.locks_dir = self.root / LOCKS_DIR
        self.max_inflated_bytes = max_inflated_bytes
        for d in (self.root, self.incoming, self.state_dir, self.locks_dir):
            make_private_dirs(d)
        # Serialises the compare, write and rename of one SOP Instance UID
        # arriving on two associations at once (other UIDs are not held up).
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._process_locks = _ProcessLocks(self.locks_dir)
        # Filled on the first write: a spool that only refuses writes no file.
        use_pool = clean_incoming if pooled is None else pooled
        self.pool: FilePool | None = FilePool(self.pool_dir) if use_pool else None
        if clean_incoming:
            self._clean_incoming()
            self._recover_pool()

    # --- paths -------------------------------------------------------------
    def instance_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """The spool path of an instance; every component must be a valid UID.

        Raises:
            InvalidUIDError: a UID does not follow PS3.5 §9.1 (it would become a path).
        """
        return (
            self.root
            / require_uid(study_uid, "Study Instance UID")
            / require_uid(series_uid, "Series Instance UID")
            / (require_uid(sop_instance_uid, "SOP Instance UID") + SUFFIX)
        )

    def study_dir(self, study_uid: str) -> Path:
        return self.root / require_uid(study_uid, "Study Instance UID")

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    # --- writing ----------------------------------------------------------
    def store(
        self,
        dataset: bytes | bytearray | memoryview | io.BytesIO,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        calling_aet: str = "",
    ) -> StoreResult:
        """Write one received data set (without file meta) durably to the spool.

        ``sop_class_uid``/``sop_instance_uid`` are the Affected SOP Class/Instance
        UIDs of the C-STORE request; they must match the data set (PS3.4
        §B.2.1).

        A copy identical to the file already spooled under that SOP Instance
        UID is a :attr:`StoreOutcome.DUPLICATE` and writes nothing.

        Raises:
            SpoolRefusal: data we must not accept (invalid or mismatched UIDs,
                unreadable header, a deflated data set inflating beyond
                ``max_inflated_bytes``); nothing was written.
            SpoolWriteError: the disk failed us (the sender should retry);
                nothing was committed.
        """
        try:
            require_uid(sop_class_uid, "Affected SOP Class UID")
            require_uid(sop_instance_uid, "Affected SOP Instance UID")
            require_uid(transfer_syntax_uid, "Transfer Syntax UID")
        except InvalidUIDError as exc:
            raise SpoolRefusal(str(exc)) from None

        with _buffer(dataset) as data:
            # Read the header from memory first: a refused data set is never written.
            study_uid, series_uid, expected = self._read_header(
                data, transfer_syntax_uid, sop_class_uid, sop_instance_uid
            )
            final = self.instance_path(study_uid, series_uid, sop_instance_uid)
            meta = encode_file_meta(
                sop_class_uid, sop_instance_uid, transfer_syntax_uid, calling_aet
            )
            if self.pool is not None:
                meta = _with_commit_check(meta, data)
            size = len(meta) + data.nbytes
            try:
                with self._instance_lock(sop_instance_uid):
                    outcome = self._commit(final, meta, data)
            except OSError as exc:
                raise SpoolWriteError(f"writing to the spool failed: {exc.strerror}") from None

        instance = SpooledInstance(
            study_uid=study_uid,
            series_uid=series_uid,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            path=final,
            size=size,
            calling_aet=calling_aet,
            received_at=datetime.now(UTC),
        )
        return StoreResult(instance=instance, outcome=outcome, expected_count=expected)

    @contextmanager
    def _instance_lock(self, sop_instance_uid: str) -> Iterator[None]:
        """Hold one SOP Instance UID against other threads and other processes.

        Threads of this process wait on the UID's own lock; processes on one of
        :data:`_LOCK_BUCKETS` lock files (:class:`_ProcessLocks`).

        Raises:
            OSError: the lock file cannot be opened or locked.
        """
        bucket = zlib.crc32(sop_instance_uid.encode("ascii")) % _LOCK_BUCKETS
        with self._lock_for(sop_instance_uid), self._process_locks.hold(bucket):
            yield

    def _lock_for(self, key: str) -> threading.Lock:
        with self._locks_guard:
            lock = self._locks.get(key)
            if lock is None:
                if len(self._locks) > 4096:  # bounded: drop idle locks
                    self._locks = {k: v for k, v in self._locks.items() if v.locked()}
                lock = self._locks[key] = threading.Lock()
            return lock

    def _read_header(
        self,
        data: memoryview,
        transfer_syntax_uid: str,
        sop_class_uid: str,
        sop_instance_uid: str,
    ) -> tuple[str, str, int | None]:
        """The study and series UIDs we file by, and the announced study size, checked."""
        try:
            header = read_received_header(
                data, transfer_syntax_uid, max_inflated_bytes=self.max_inflated_bytes
            )
        except InflationLimitExceeded as exc:
            raise SpoolRefusal(str(exc), RefusalKind.TOO_LARGE) from None
        except HeaderError as exc:
            raise SpoolRefusal(str(exc), RefusalKind.UNREADABLE) from None
        study, series, ds_sop, ds_class, expected_raw = (
            header.study_uid,
            header.series_uid,
            header.sop_instance_uid,
            header.sop_class_uid,
            header.number_of_study_related_instances,
        )
        try:
            study = require_uid(study, "Study Instance UID")
            series = require_uid(series, "Series Instance UID")
        except InvalidUIDError as exc:
            raise SpoolRefusal(str(exc)) from None
        # PS3.4 §B.2.1: the data set's SOP Instance/Class UID must equal the
        # Affected ones in the command; a mismatch means the sender is confused.
        if ds_sop is not None and ds_sop != sop_instance_uid:
            raise SpoolRefusal(
                "SOP Instance UID in data set differs from the C-STORE request",
                RefusalKind.UID_MISMATCH,
            )
        if ds_class is not None and ds_class != sop_class_uid:
            raise SpoolRefusal(
                "SOP Class UID in data set differs from the C-STORE request",
                RefusalKind.UID_MISMATCH,
            )
        expected: int | None = None
        if expected_raw and expected_raw.isdigit() and int(expected_raw) > 0:
            expected = int(expected_raw)
        return study, series, expected

    def _commit(self, final: Path, meta: bytes, data: memoryview) -> StoreOutcome:
        """Write ``meta`` + ``data`` durably at ``final`` unless that file holds them already.

        The caller holds the SOP Instance UID's lock.

        Raises:
            OSError: writing, flushing or renaming failed; nothing was committed.
        """
        if final.exists():
            if final.stat().st_size == len(meta) + data.nbytes:
                digest = hashlib.sha256(meta)
                digest.update(data)
                if _file_digest(final) == digest.digest():
                    return StoreOutcome.DUPLICATE
            outcome = StoreOutcome.REPLACED
            # The removals of earlier pool names (this instance's older
            # version among them) become durable before the newer version can
            # be acknowledged: recovery then never promotes an older version.
            self._flush_pool_names()
        else:
            outcome = StoreOutcome.NEW
        if self.pool is None:
            tmp, _size = write_temp(self.incoming, [meta, data])
            try:
                commit(tmp, final)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        else:
            pooled, _size = write_pooled(self.pool, [meta, data])
            try:
                rename_pooled(pooled, final)
            except BaseException:
                self.pool.discard(pooled)
                raise
        return outcome

    def _flush_pool_names(self) -> None:
        """Make the pool folder's entries durable (every pool name renamed away is gone)."""
        if self.pool_dir.is_dir():
            fsync_dir(self.pool_dir)

    def _clean_incoming(self) -> None:
        """Remove temporary files of writes a crash interrupted (never acknowledged)."""
        for folder in (self.incoming, self.state_dir):
            for leftover in folder.iterdir():
                if leftover.name.endswith(".part"):
                    leftover.unlink(missing_ok=True)

    def _recover_pool(self) -> None:
        """Promote complete pool files a crash left behind; remove the others (module docstring).

        Raises:
            OSError: a pool file cannot be renamed or removed, or a folder flushed.
        """
        if not self.pool_dir.is_dir():
            return
        changed: set[Path] = set()
        promoted = removed = kept = 0
        for leftover in sorted(self.pool_dir.iterdir()):
            if not leftover.name.endswith(POOL_SUFFIX) or not leftover.is_file():
                continue
            try:
                final = self._promotion_target(leftover)
            except _KeepPoolFile as exc:
                log.warning("pool file left in place for inspection (%s)", exc)
                kept += 1
                continue
            if final is not None and not (
                final.exists() and _file_digest(final) == _file_digest(leftover)
            ):
                rename_pooled(leftover, final)
                changed.add(final.parent)
                promoted += 1
                continue
            leftover.unlink(missing_ok=True)  # empty, torn, or already in place
            removed += 1
        for folder in sorted(changed):
            sync_dir(folder)
        fsync_dir(self.pool_dir)  # last: a pool file reappears only if its rename did not last
        if promoted:
            log.warning("recovered %d complete instance file(s) from the spool pool", promoted)
        if removed or kept:
            log.info("pool recovery: %d file(s) removed, %d left in place", removed, kept)

    def _promotion_target(self, pool_file: Path) -> Path | None:
        """The final path of a complete pool file; None when it is empty or torn.

        Raises:
            _KeepPoolFile: the file cannot be read, or it is complete but its
                header cannot be filed; it may hold an acknowledged instance.
        """
        try:
            with pool_file.open("rb") as fh:
                if os.fstat(fh.fileno()).st_size == 0:
                    return None
                with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                    raw = memoryview(mapped)
                    try:
                        data_start = _checked_data_start(raw)
                        if data_start is None:
                            return None
                        meta = pydicom.filereader.read_file_meta_info(pool_file)
                        sop_instance = str(meta.MediaStorageSOPInstanceUID)
                        with raw[data_start:] as data:
                            study, series, _expected = self._read_header(
                                data,
                                str(meta.TransferSyntaxUID),
                                str(meta.MediaStorageSOPClassUID),
                                sop_instance,
                            )
                    finally:
                        raw.release()
            return self.instance_path(study, series, sop_instance)
        except (OSError, ValueError, AttributeError, SpoolRefusal) as exc:
            raise _KeepPoolFile(type(exc).__name__) from None

    # --- reading back -----------------------------------------------------
    def scan_study(self, study_uid: str) -> list[SpooledInstance]:
        """Rebuild the instance list of a study from the files on disk (restart recovery)."""
        study_dir = self.study_dir(study_uid)
        found: list[SpooledInstance] = []
        if not study_dir.is_dir():
            return found
        for series_dir in sorted(study_dir.iterdir()):
            if not series_dir.is_dir() or not series_dir.name.replace(".", "").isdigit():
                continue
            for f in sorted(series_dir.glob("*" + SUFFIX)):
                inst = self._instance_from_file(study_uid, series_dir.name, f)
                if inst is not None:
                    found.append(inst)
        return found

    def _instance_from_file(
        self, study_uid: str, series_uid: str, path: Path
    ) -> SpooledInstance | None:
        try:
            sop_uid = require_uid(path.name[: -len(SUFFIX)], "SOP Instance UID")
            require_uid(series_uid, "Series Instance UID")
            meta = pydicom.filereader.read_file_meta_info(path)
            st = path.stat()
        except Exception as exc:
            log.warning(
                "unreadable spool file in study %s skipped (%s)", study_uid, type(exc).__name__
            )
            return None
        return SpooledInstance(
            study_uid=study_uid,
            series_uid=series_uid,
            sop_instance_uid=sop_uid,
            sop_class_uid=str(meta.get("MediaStorageSOPClassUID", "")),
            transfer_syntax_uid=str(meta.get("TransferSyntaxUID", "")),
            path=path,
            size=st.st_size,
            calling_aet=str(meta.get("SourceApplicationEntityTitle", "") or "").strip(),
            received_at=datetime.fromtimestamp(st.st_mtime, UTC),
        )

    def sop_uids_on_disk(self, study_uid: str) -> set[str]:
        """SOP Instance UIDs of a study's files, from their names alone (nothing is read)."""
        study_dir = self.study_dir(study_uid)
        if not study_dir.is_dir():
            return set()
        return {
            f.name[: -len(SUFFIX)]
            for series_dir in study_dir.iterdir()
            if series_dir.is_dir()
            for f in series_dir.iterdir()
            if f.name.endswith(SUFFIX) and is_valid_uid(f.name[: -len(SUFFIX)])
        }

    def study_uids_on_disk(self) -> list[str]:
        """Study directories present in the spool (names that are valid UIDs)."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and is_valid_uid(p.name))

    # --- retention --------------------------------------------------------
    def purge_study(self, study_uid: str, *, received_before: datetime | None = None) -> list[str]:
        """Delete a study's spooled files (its pixels); return the SOP Instance UIDs deleted.

        ``received_before`` keeps every file written at or after that time
        (its modification time is when the spool committed it), so an
        instance that arrived after the caller decided to purge survives;
        None deletes every file of the study. Files the database may not know
        (an instance refused for reusing another study's SOP Instance UID)
        go too: the spool folder is the truth. Emptied series and study
        folders are removed, and each changed folder is ``fsync``-ed so the
        deletion survives a power loss. The study's journal is kept: it holds
        UIDs and counters, no PHI, and tells a restarted listener that the
        study was dispatched. Repeating a purge deletes nothing more.

        Raises:
            InvalidUIDError: ``study_uid`` is not a valid UID (it would become a path).
            OSError: a file or folder could not be deleted.
        """
        study_dir = self.study_dir(study_uid)
        if not study_dir.is_dir():
            return []
        # A pool name renamed into this study must not come back after a crash
        # and be promoted again once the file is deleted.
        self._flush_pool_names()
        cutoff = None if received_before is None else received_before.timestamp()
        deleted: list[str] = []
        for series_dir in sorted(p for p in study_dir.iterdir() if p.is_dir()):
            for f in sorted(series_dir.glob("*" + SUFFIX)):
                if cutoff is None or f.stat().st_mtime < cutoff:
                    f.unlink()
                    deleted.append(f.name[: -len(SUFFIX)])
            fsync_dir(series_dir)
            _remove_if_empty(series_dir)
        fsync_dir(study_dir)
        _remove_if_empty(study_dir)
        fsync_dir(self.root)
        return deleted


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
