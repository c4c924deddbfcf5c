"""Stage 1, load: the study's instance rows from the database, each file's header from the spool.

Only headers are read here (:func:`dicom_io.part10.read_header`: parsing stops
before Pixel Data), so an instance that selection skips, a CT series or a
lateral view, costs its header only; stage 2 decodes the pixels of the
selected instances alone, from ``LoadedInstance.path``.

Received headers are not trusted: each parsed data set is repaired in place by
:func:`dicom_io.sanitize.sanitize_header` (invalid dates and times blanked, NULs
stripped) before any later stage reads it, and the repairs are logged as codes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydicom.dataset import Dataset

from db import repository as repo
from db.engine import session_scope
from dicom_io.part10 import read_header
from dicom_io.sanitize import sanitize_header
from dicom_io.selection import SkipReason
from dicom_io.uids import require_uid

__all__ = ["LoadedInstance", "LoadedStudy", "load_study", "parse_instance"]

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


def load_study(database_url: str, study_id: int, revision: int) -> LoadedStudy:
    """Load ``study_id`` with every instance file's header parsed (pixels are left on disk).

    Raises:
        LookupError: no study row has ``study_id``.
        InvalidUIDError: the stored Study Instance UID is not a valid UID (PS3.5 §9.1).
    """
    with session_scope(database_url) as session:
        files = repo.study_files(session, study_id)
    if files is None:
        raise LookupError(f"study id {study_id} not in the database")
    study_uid = require_uid(files.study_uid, "Study Instance UID")
    instances = tuple(parse_instance(f) for f in files.instances)
    return LoadedStudy(study_id, study_uid, revision, instances)
