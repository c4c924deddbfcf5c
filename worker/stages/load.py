"""Stage 1, load: the study's instance rows from the database, each file's header from the spool.

Only headers are read here (:func:`dicom_io.part10.read_header`: parsing stops
before Pixel Data), so an instance that selection skips, a CT series or a
lateral view, costs its header only; stage 2 decodes the pixels of the
selected instances alone, from ``LoadedInstance.path``.

Received headers are not trusted: each parsed data set is repaired in place by
:func:`dicom_io.sanitize.sanitize_header` (invalid dates and times blanked, NULs
stripped) before any later stage reads it, and the repairs are logged as codes.

Instance files the spool no longer holds (retention deleted them, ``pneumo
purge``) are fetched back from the PACS first when a :class:`PixelSource`
names one (:mod:`dicom_io.retrieve`, C-GET or C-MOVE into the spool), and
their new paths are recorded; without a PACS, or when the PACS cannot give
them all back, the study fails with :class:`PixelsUnavailableError`, so a
rerun never replaces a result with "no usable image" for lack of files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from pydicom.dataset import Dataset

from db import repository as repo
from db.engine import session_scope
from dicom_io.config import TLSConfig
from dicom_io.part10 import read_header
from dicom_io.retrieve import PacsAddress, RetrieveError, RetrieveMethod, retrieve_study
from dicom_io.sanitize import sanitize_header
from dicom_io.selection import SkipReason
from dicom_io.spool import Spool
from dicom_io.uids import require_uid
from worker.config import WorkerConfig

__all__ = [
    "LoadedInstance",
    "LoadedStudy",
    "PixelSource",
    "PixelsUnavailableError",
    "load_study",
    "parse_instance",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedInstance:
    """One received instance, parsed; ``dataset`` None when the file could not be read."""

    instance_id: int
    sop_instance_uid: str
    dataset: Dataset | None
    skip_reason: str | None = None
    """:attr:`SkipReason.UNREADABLE` exactly when ``dataset`` is None."""
    header_fixes: tuple[str, ...] = ()
    """What the sanitiser repaired, as ``<kind>:<attribute>`` codes (never values)."""
    path: str | None = None
    """The spooled file, whose pixels stage 2 reads when ``dataset`` holds the header only."""


@dataclass(frozen=True)
class LoadedStudy:
    """One revision of one study, as stored: what every later stage starts from."""

    study_id: int
    study_uid: str
    revision: int
    instances: tuple[LoadedInstance, ...]

    @property
    def first_dataset(self) -> Dataset | None:
        """The first parsed instance (its header stands for the study's patient)."""
        return next((i.dataset for i in self.instances if i.dataset is not None), None)


class PixelsUnavailableError(LookupError):
    """Instance files are missing from the spool and could not be fetched back.

    The message gives counts, the PACS (``AE@host:port``) and a DICOM status;
    never a value from a data set.
    """


@dataclass(frozen=True)
class PixelSource:
    """Where stage 1 gets instance files the spool no longer holds: a PACS, or nowhere."""

    spool_dir: Path
    """The listener's spool: retrieved instances are written (C-GET) or arrive (C-MOVE) there."""
    pacs: PacsAddress | None = None
    """The Query/Retrieve SCP; None = missing files fail the study."""
    method: RetrieveMethod = RetrieveMethod.GET
    ae_title: str = "PNEUMO"
    """Our calling AE title, and the C-MOVE destination (our listener)."""
    tls: TLSConfig | None = None
    timeout_seconds: float = 30.0

    @classmethod
    def from_config(cls, config: WorkerConfig) -> PixelSource:
        """The source ``config`` describes (``pacs``, ``retrieve_method``, ``spool_dir``)."""
        pacs = config.pacs
        return cls(
            spool_dir=config.spool_dir or config.data_dir / "spool",
            pacs=None if pacs is None else PacsAddress(pacs.ae_title, pacs.host, pacs.port),
            method=RetrieveMethod(config.retrieve_method),
            ae_title=config.ae_title,
            tls=config.tls,
        )


def _fetch_missing(
    database_url: str, files: repo.StudyFiles, source: PixelSource
) -> repo.StudyFiles:
    """``files`` with every missing instance file fetched back from the PACS (paths recorded).

    Raises:
        PixelsUnavailableError: files are missing and there is no PACS, the
            PACS cannot be reached, or it did not give every one back (those
            it did give back are kept and recorded).
    """
    missing = [f.sop_instance_uid for f in files.instances if not Path(f.path).is_file()]
    if not missing:
        return files
    gone = f"{len(missing)} of {len(files.instances)} instance file(s) missing from the spool"
    if source.pacs is None:
        raise PixelsUnavailableError(f"{gone} (purged?) and no PACS configured to retrieve them")
    log.info("study %s: %s; retrieving from %s", files.study_uid, gone, source.pacs)
    try:
        result = retrieve_study(
            source.pacs,
            files.study_uid,
            Spool(source.spool_dir, clean_incoming=False),  # not the listener: leave .incoming
            method=source.method,
            sop_instance_uids=missing,
            calling_ae=source.ae_title,
            tls=source.tls,
            timeout_seconds=source.timeout_seconds,
        )
    except (RetrieveError, ValueError, OSError) as exc:
        reason = str(exc) if isinstance(exc, RetrieveError) else type(exc).__name__
        raise PixelsUnavailableError(f"{gone}; retrieval failed: {reason}") from None
    if result.received:
        with session_scope(database_url) as session:
            repo.record_retrieved_files(
                session, files.study_id, {uid: str(p) for uid, p in result.received.items()}
            )
    if not result.ok:
        raise PixelsUnavailableError(
            f"{gone}; {len(result.failed)} not retrieved from PACS {source.pacs} by "
            f"C-{source.method.value.upper()}: {result.failed[0].reason}"
        )
    received = {uid: str(p) for uid, p in result.received.items()}
    return replace(
        files,
        instances=tuple(
            replace(f, path=received.get(f.sop_instance_uid, f.path)) for f in files.instances
        ),
    )


def parse_instance(file: repo.InstanceFile) -> LoadedInstance:
    """Read and sanitise one spooled file's header (no pixels).

    A missing or corrupt file gives a reason, not an error.
    """
    try:
        ds = read_header(file.path)
        fixes = tuple(fix.code for fix in sanitize_header(ds))
    except Exception as exc:  # a header too broken to repair is as good as unreadable
        log.warning("instance %s unreadable: %s", file.sop_instance_uid, type(exc).__name__)
        return LoadedInstance(
            file.instance_id, file.sop_instance_uid, None, SkipReason.UNREADABLE, path=file.path
        )
    if fixes:
        log.info("instance %s: header repaired: %s", file.sop_instance_uid, ",".join(fixes))
    return LoadedInstance(
        file.instance_id, file.sop_instance_uid, ds, header_fixes=fixes, path=file.path
    )


def load_study(
    database_url: str, study_id: int, revision: int, *, source: PixelSource | None = None
) -> LoadedStudy:
    """Load ``study_id`` with every instance file's header parsed (pixels are left on disk).

    With a ``source``, instance files missing from the spool are fetched back
    from its PACS first (or the study fails); without one, a missing file is
    an unreadable instance, as a corrupt one is.

    Raises:
        LookupError: no study row has ``study_id``.
        InvalidUIDError: the stored Study Instance UID is not a valid UID (PS3.5 §9.1).
        PixelsUnavailableError: (with ``source``) files are missing and could
            not all be retrieved from the PACS, or no PACS is configured.
    """
    with session_scope(database_url) as session:
        files = repo.study_files(session, study_id)
    if files is None:
        raise LookupError(f"study id {study_id} not in the database")
    study_uid = require_uid(files.study_uid, "Study Instance UID")
    if source is not None:
        files = _fetch_missing(database_url, files, source)
    instances = tuple(parse_instance(f) for f in files.instances)
    return LoadedStudy(study_id, study_uid, revision, instances)
