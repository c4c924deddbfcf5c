"""Retention: delete the spooled pixels of finished studies after a number of days.

The spool keeps every received instance as it arrived (PHI). Once a study is
``done`` or ``dead-letter`` and older than the retention period, its files
have served their purpose: :func:`purge_spool` deletes them
(:meth:`dicom_io.spool.Spool.purge_study`) and then marks the instance rows
:data:`db.repository.PIXELS_PURGED`, so a later ``pneumo reprocess`` is
refused instead of replacing the result with "no usable image". Result rows,
result files, job rows and the audit trail are never touched.

Files are deleted before the rows are marked, and a row is marked when its
file is gone: a crash in between leaves rows that the next run marks
(deleting nothing more), never rows that claim a deletion that did not happen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from db import repository as repo
from db.engine import session_scope
from dicom_io.spool import Spool

__all__ = ["PurgeReport", "purge_spool"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PurgeReport:
    """What one purge did (counts only: nothing identifying)."""

    studies: int
    files_deleted: int
    instances_marked: int


def purge_spool(
    database_url: str,
    spool_dir: Path,
    *,
    older_than_days: float,
    dry_run: bool = False,
    now: datetime | None = None,
) -> PurgeReport:
    """Delete the spooled files of done or dead-lettered studies received > ``older_than_days`` ago.

    Files written after the cutoff (a late instance) are kept. ``dry_run``
    counts the candidate studies without deleting anything.

    Raises:
        ValueError: ``older_than_days`` is negative.
        OSError: a spool file or folder could not be deleted (the studies
            purged before it stay purged and recorded).
        sqlalchemy.exc.SQLAlchemyError: the database could not be read or written.
    """
    if older_than_days < 0:
        raise ValueError("older_than_days must be >= 0")
    cutoff = (now or datetime.now(UTC)) - timedelta(days=older_than_days)
    with session_scope(database_url) as session:
        candidates = repo.studies_to_purge(session, cutoff)
    if dry_run:
        return PurgeReport(len(candidates), 0, 0)
    # Not the listener: leave its writes in progress alone.
    spool = Spool(spool_dir, clean_incoming=False)
    studies = files = marked = 0
    for candidate in candidates:
        deleted, count = _purge_one(database_url, spool, candidate, cutoff)
        if deleted or count:
            studies, files, marked = studies + 1, files + deleted, marked + count
    return PurgeReport(studies, files, marked)


def _purge_one(
    database_url: str, spool: Spool, candidate: repo.PurgeCandidate, cutoff: datetime
) -> tuple[int, int]:
    """Delete one study's old files, then mark every row whose file is gone; return both counts.

    Marking by "file gone" rather than "deleted now" also records files an
    interrupted earlier run deleted without marking them.
    """
    deleted = spool.purge_study(candidate.study_uid, received_before=cutoff)
    with session_scope(database_url) as session:
        files = repo.study_files(session, candidate.study_id)
        gone = (
            [f.sop_instance_uid for f in files.instances if not Path(f.path).exists()]
            if files
            else []
        )
        marked = repo.mark_pixels_purged(session, candidate.study_id, gone)
    if deleted or marked:
        log.info("study %s: spooled pixels purged (%d file(s))", candidate.study_uid, len(deleted))
    return len(deleted), marked
