"""The receive spool: received instances written durably, exactly as they arrived.

Layout (every path component a UID checked by :func:`dicom_io.uids.require_uid`)::

    <spool_dir>/<study_uid>/<series_uid>/<sop_instance_uid>.dcm
    <spool_dir>/.incoming/   temporary files being written (same file system)
    <spool_dir>/.state/      study assembly journal (see ``dicom_io.assembly``)

A spooled file is a DICOM Part 10 file (PS3.10 §7.1): 128-byte preamble,
``DICM``, File Meta Information (group 0002) that we write, then the data set
bytes *exactly as received* in the negotiated transfer syntax. Nothing is
decoded and re-encoded, so a lossy or vendor-specific encoding is never altered.

Durability: the instance is written to a temporary file, ``fsync``-ed, renamed
into place, and the directory is ``fsync``-ed; only then may the listener answer
C-STORE Success (PS3.4 §B.2.3), because after Success the sender may delete
its copy.

Speed (see ``bench/ingest.py``): the two flushes to stable storage dominate a
small instance, so everything else on the path is kept to a minimum: the few
header UIDs are read from the received bytes in memory *before* anything is
written (a refused data set never touches the disk), the File Meta Information
is encoded directly, and the file is written with one ``writev``.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import io
import logging
import os
import shutil
import struct
import threading
import uuid
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pydicom
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

from dicom_io.uids import InvalidUIDError, is_valid_uid, require_uid

log = logging.getLogger(__name__)

INCOMING_DIR = ".incoming"
STATE_DIR = ".state"
SUFFIX = ".dcm"

# Our implementation identity in the File Meta Information (PS3.7 §D.3.3.2).
IMPLEMENTATION_CLASS_UID = "2.25.270431947357296262113384587331046591817"
IMPLEMENTATION_VERSION_NAME = "PNEUMO_010"

# The only header elements the receive path reads (never pixels, never PHI).
_HEADER_TAGS = [
    Tag(0x0008, 0x0016),  # SOP Class UID
    Tag(0x0008, 0x0018),  # SOP Instance UID
    Tag(0x0020, 0x000D),  # Study Instance UID
    Tag(0x0020, 0x000E),  # Series Instance UID
    Tag(0x0020, 0x1208),  # Number of Study Related Instances
]

_LAST_HEADER_TAG = Tag(0x0020, 0x1208)

_COPY_CHUNK = 1 << 20

# Transfer syntaxes whose data set is not Explicit VR Little Endian (PS3.5 §10, Annex A).
_IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
_EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_DEFLATED_TRANSFER_SYNTAXES = frozenset(
    {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.204"}  # Deflated Explicit VR LE, Deflated Image Frame
)


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


class SpoolRefusal(Exception):
    """The data set cannot be accepted (bad or missing UIDs, unreadable header).

    The message is PHI-free by construction: it names attributes, never values.
    """

    def __init__(self, message: str, kind: RefusalKind = RefusalKind.INVALID_UID) -> None:
        super().__init__(message)
        self.kind = kind


class SpoolWriteError(Exception):
    """The instance could not be written durably (disk full, I/O error)."""


def _raw_text(ds: pydicom.Dataset, tag: Tag) -> str | None:
    """The text of a string element (UI, IS) as stored, or None when absent/empty.

    UI values are padded with NUL, other strings with space (PS3.5 §6.2).
    """
    if tag not in ds:
        return None
    value = ds.get_item(tag).value
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("ascii", "replace")
    elif value is None:
        return None
    else:
        text = str(value)
    text = text.strip("\x00 ")
    return text or None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_digest(path: Path) -> bytes:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_COPY_CHUNK):
            h.update(chunk)
    return h.digest()


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, Explicit VR Little Endian (PS3.10 §7.1, PS3.5 §7.1.2)."""
    if vr == b"OB":  # 2 reserved bytes and a 32-bit length
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    """An even-length value: UI padded with NUL, other strings with space (PS3.5 §6.2)."""
    raw = text.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def encode_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, calling_aet: str
) -> bytes:
    """Preamble, ``DICM`` prefix and File Meta Information (PS3.10 §7.1).

    Encoded directly rather than through pydicom's writer (a measurable share
    of a small instance's CPU time); ``tests/dicom_receive/test_spool.py``
    checks the bytes equal pydicom's ``write_file_meta_info`` output.
    """
    body = b"".join(
        [
            _meta_element(0x0001, b"OB", b"\x00\x01"),  # File Meta Information Version
            _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
            _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
            _meta_element(0x0010, b"UI", _padded(transfer_syntax_uid, b"\x00")),
            _meta_element(0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\x00")),
            _meta_element(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
            *(
                [_meta_element(0x0016, b"AE", _padded(calling_aet, b" "))]
                if calling_aet
                else []
            ),
        ]
    )
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


def _write_all(fd: int, parts: list[bytes | memoryview]) -> int:
    """Write ``parts`` to ``fd`` with as few system calls as possible; return the size."""
    total = sum(len(p) for p in parts)
    written = os.writev(fd, parts)
    done = written
    while done < total:  # a partial write (signal, huge buffer): continue where it stopped
        rest: list[bytes | memoryview] = []
        for p in parts:  # drop what the last call wrote
            if written >= len(p):
                written -= len(p)
                continue
            rest.append(memoryview(p)[written:])
            written = 0
        parts = rest
        written = os.writev(fd, parts)
        if written <= 0:
            raise OSError(errno.ENOSPC, "no progress writing the spool file")
        done += written
    return total


def _dataset_encoding(transfer_syntax_uid: str) -> tuple[bool, bool, bool]:
    """(implicit VR, little endian, deflated) of a data set in this transfer syntax.

    PS3.5 §10: everything except Implicit VR Little Endian and the retired
    Explicit VR Big Endian is Explicit VR Little Endian; deflated syntaxes
    compress the whole data set (PS3.5 §A.5).
    """
    if transfer_syntax_uid == _IMPLICIT_VR_LITTLE_ENDIAN:
        return True, True, False
    if transfer_syntax_uid == _EXPLICIT_VR_BIG_ENDIAN:
        return False, False, False
    if transfer_syntax_uid in _DEFLATED_TRANSFER_SYNTAXES:
        return False, True, True
    try:
        ts = UID(transfer_syntax_uid)
        return ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated
    except (ValueError, AttributeError):  # a private syntax pydicom does not know
        return False, True, False


def _past_header(tag: BaseTag, vr: str | None, length: int) -> bool:
    # Elements are in ascending tag order (PS3.5 §7.1): nothing we need follows.
    return tag > _LAST_HEADER_TAG


class Spool:
    """Writes received instances under ``root`` and answers where they live."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.incoming = self.root / INCOMING_DIR
        self.state_dir = self.root / STATE_DIR
        for d in (self.root, self.incoming, self.state_dir):
            d.mkdir(parents=True, exist_ok=True)
        # Serialises the compare-and-rename of one SOP Instance UID arriving on
        # two associations at once; the expensive write happens outside it.
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._clean_incoming()

    # --- paths -------------------------------------------------------------
    def instance_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """The spool path of an instance; every component must be a valid UID."""
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
        §B.2.1). Raises :class:`SpoolRefusal` for data we must not accept and
        :class:`SpoolWriteError` when the disk fails us (the sender should retry).
        """
        try:
            require_uid(sop_class_uid, "Affected SOP Class UID")
            require_uid(sop_instance_uid, "Affected SOP Instance UID")
            require_uid(transfer_syntax_uid, "Transfer Syntax UID")
        except InvalidUIDError as exc:
            raise SpoolRefusal(str(exc)) from None

        stream = dataset if isinstance(dataset, io.BytesIO) else io.BytesIO(dataset)
        # Read the header from memory first: a refused data set is never written.
        study_uid, series_uid, expected = self._read_header(
            stream, transfer_syntax_uid, sop_class_uid, sop_instance_uid
        )
        final = self.instance_path(study_uid, series_uid, sop_instance_uid)
        meta = encode_file_meta(sop_class_uid, sop_instance_uid, transfer_syntax_uid, calling_aet)

        tmp = self.incoming / f"{uuid.uuid4().hex}.part"
        committed = False
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                try:
                    with stream.getbuffer() as view:
                        size = _write_all(fd, [meta, view])
                    # Flush data and inode to stable storage before the rename
                    # can make the name visible (fdatasync measured no faster).
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise SpoolWriteError(f"writing to the spool failed: {exc.strerror}") from None
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
            received_at=datetime.now(timezone.utc),
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
        stream: io.BytesIO,
        transfer_syntax_uid: str,
        sop_class_uid: str,
        sop_instance_uid: str,
    ) -> tuple[str, str, int | None]:
        """Read the few header UIDs we file by from the received data set in memory.

        Only the elements up to (0020,1208) are parsed; values are taken from
        the raw elements, without pydicom's value conversion, so a malformed
        value is never echoed into a log by pydicom.
        """
        implicit, little, deflated = _dataset_encoding(transfer_syntax_uid)
        try:
            stream.seek(0)
            source: io.BytesIO = stream
            if deflated:
                source = io.BytesIO(zlib.decompress(stream.getvalue(), -zlib.MAX_WBITS))
            ds = read_dataset(
                source,
                implicit,
                little,
                stop_when=_past_header,
                specific_tags=list(_HEADER_TAGS),
            )
            values = {tag: _raw_text(ds, tag) for tag in _HEADER_TAGS}
        except Exception as exc:  # pydicom raises many types on malformed data
            raise SpoolRefusal(
                f"data set header unreadable ({type(exc).__name__})", RefusalKind.UNREADABLE
            ) from None
        study, series, ds_sop, ds_class, expected_raw = (
            values[Tag(0x0020, 0x000D)],
            values[Tag(0x0020, 0x000E)],
            values[Tag(0x0008, 0x0018)],
            values[Tag(0x0008, 0x0016)],
            values[Tag(0x0020, 0x1208)],
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
        created: list[Path] = []
        try:
            if final.exists():
                if final.stat().st_size == size and _file_digest(final) == _file_digest(tmp):
                    return StoreOutcome.DUPLICATE
                outcome = StoreOutcome.REPLACED
            else:
                outcome = StoreOutcome.NEW
                created = self._makedirs(final.parent)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            if outcome is StoreOutcome.NEW:
                for d in created:  # make new directory entries durable too
                    _fsync_dir(d.parent)
        except OSError as exc:
            raise SpoolWriteError(f"committing to the spool failed: {exc.strerror}") from None
        return outcome

    @staticmethod
    def _makedirs(path: Path) -> list[Path]:
        created: list[Path] = []
        for d in (path.parent, path):
            try:
                d.mkdir()
                created.append(d)
            except FileExistsError:
                pass
        return created

    def _clean_incoming(self) -> None:
        """Remove temporary files of writes a crash interrupted (never acknowledged)."""
        for leftover in self.incoming.glob("*.part"):
            try:
                leftover.unlink()
            except OSError:
                pass

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
            received_at=datetime.fromtimestamp(st.st_mtime, timezone.utc),
        )

    def remove_study(self, study_uid: str) -> None:
        """Delete a study's files and its assembly journal (after it was archived).

        Remove both together: a study directory without a journal is treated as
        pending after a restart, and would be dispatched again.
        """
        shutil.rmtree(self.study_dir(study_uid), ignore_errors=True)
        (self.state_dir / f"{require_uid(study_uid, 'Study Instance UID')}.json").unlink(
            missing_ok=True
        )

    def study_uids_on_disk(self) -> list[str]:
        """Study directories present in the spool (names that are valid UIDs)."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and is_valid_uid(p.name))
