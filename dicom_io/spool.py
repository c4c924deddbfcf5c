"""The receive spool: received instances written durably, exactly as they arrived.

Layout (every path component a UID checked by :func:`dicom_io.uids.require_uid`)::

    <spool_dir>/<study_uid>/<series_uid>/<sop_instance_uid>.dcm
    <spool_dir>/.incoming/   temporary files being written (same file system)
    <spool_dir>/.state/      study assembly journal (see ``dicom_io.assembly``)

A spooled file is a DICOM Part 10 file (PS3.10 §7.1): 128-byte preamble,
``DICM``, File Meta Information (group 0002) that we write, then the data set
bytes *exactly as received* in the negotiated transfer syntax. Nothing is
decoded and re-encoded, so a lossy or vendor-specific encoding is never altered.

Durability (:mod:`dicom_io.durable`): the instance is written to a 0600
temporary file, ``fsync``-ed, renamed into place, and the directory is
``fsync``-ed; only then may the listener answer C-STORE Success (PS3.4
§B.2.3), because after Success the sender may delete its copy. Folders are
0700: the spool holds PHI.

A deflated data set (PS3.5 §A.5) is inflated in bounded steps to read its
header and refused (:attr:`RefusalKind.TOO_LARGE`) when it inflates beyond
``max_inflated_bytes``, so no deflate bomb reaches the spool or the worker.

Speed (see ``bench/ingest.py``): the two flushes to stable storage dominate a
small instance, so everything else on the path is kept to a minimum: the few
header UIDs are read from the received bytes in memory *before* anything is
written (a refused data set never touches the disk), the File Meta Information
is encoded directly (:mod:`dicom_io.part10`), and the file is written with one
``writev``.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import io
import logging
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pydicom

from dicom_io.config import DEFAULT_MAX_INFLATED_BYTES
from dicom_io.durable import commit, fsync_dir, make_private_dirs, write_temp
from dicom_io.part10 import (
    HeaderError,
    InflationLimitExceeded,
    encode_file_meta,
    read_received_header,
)
from dicom_io.uids import InvalidUIDError, is_valid_uid, require_uid

__all__ = [
    "INCOMING_DIR",
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
STATE_DIR = ".state"
SUFFIX = ".dcm"

_COPY_CHUNK = 1 << 20


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
    ) -> None:
        """Open (and create, 0700) the spool at ``root``.

        ``clean_incoming`` removes temporary files a crash left behind; only
        the listener may do that. Another process opening the spool while a
        listener runs (``pneumo purge``) passes False, or it would delete the
        listener's writes in progress.
        """
        self.root = Path(root)
        self.incoming = self.root / INCOMING_DIR
        self.state_dir = self.root / STATE_DIR
        self.max_inflated_bytes = max_inflated_bytes
        for d in (self.root, self.incoming, self.state_dir):
            make_private_dirs(d)
        # Serialises the compare-and-rename of one SOP Instance UID arriving on
        # two associations at once; the expensive write happens outside it.
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        if clean_incoming:
            self._clean_incoming()

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
            try:
                tmp, size = write_temp(self.incoming, [meta, data])
            except OSError as exc:
                raise SpoolWriteError(f"writing to the spool failed: {exc.strerror}") from None
        committed = False
        try:
            with self._lock_for(sop_instance_uid):
                outcome = self._commit(tmp, final, size)
            committed = outcome is not StoreOutcome.DUPLICATE
        finally:
            if not committed:  # after a successful rename ``tmp`` no longer exists
                tmp.unlink(missing_ok=True)

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

    def _commit(self, tmp: Path, final: Path, size: int) -> StoreOutcome:
        """Rename ``tmp`` over ``final`` unless it holds the same bytes already."""
        try:
            if final.exists():
                if final.stat().st_size == size and _file_digest(final) == _file_digest(tmp):
                    return StoreOutcome.DUPLICATE
                outcome = StoreOutcome.REPLACED
            else:
                outcome = StoreOutcome.NEW
            commit(tmp, final)
        except OSError as exc:
            raise SpoolWriteError(f"committing to the spool failed: {exc.strerror}") from None
        return outcome

    def _clean_incoming(self) -> None:
        """Remove temporary files of writes a crash interrupted (never acknowledged)."""
        for folder in (self.incoming, self.state_dir):
            for leftover in folder.iterdir():
                if leftover.name.endswith(".part"):
                    leftover.unlink(missing_ok=True)

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
