"""The listener's side of the pipeline: record what arrived, enqueue what is ready.

:class:`Intake` supplies the two callbacks of :class:`dicom_io.listener.Listener`.
Order matters for no loss: the study is committed to the database *before* its
task is published, and a failure to publish raises, so the listener keeps the
study pending and offers it again later (its contract) instead of dropping it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from celery import Celery
from sqlalchemy.exc import SQLAlchemyError

from db import repository as repo
from db.engine import session_scope
from dicom_io.assembly import ReadyStudy
from dicom_io.part10 import read_header
from dicom_io.sanitize import sanitize_header
from dicom_io.spool import SpooledInstance
from dicom_io.uids import require_uid
from worker.config import WorkerConfig
from worker.intended_use import parse_da
from worker.queues import QueueName
from worker.tasks import PROCESS_STUDY

__all__ = ["OUTAGE_PAUSE_SECONDS", "Intake", "PixelsPurgedError", "read_study_header"]

log = logging.getLogger(__name__)

_HEADER_TAGS = ["PatientID", "AccessionNumber", "StudyDate", "PatientAge"]


def read_study_header(path: str | Path) -> repo.StudyHeader:
    """The staff-query attributes of a study, from one of its files (no pixel data read).

    Received values are not trusted: they are sanitised first
    (:func:`dicom_io.sanitize.sanitize_header`: NUL stripped, invalid DA
    blanked), then cut to their column's length (the VR maxima of PS3.5
    Table 6.2-1: LO 64, SH 16, AS 4), so the row can always be written. An
    unreadable header gives an empty one, never an error: the study is
    still queued.
    """
    try:
        ds = read_header(path, specific_tags=_HEADER_TAGS)
        fixes = sanitize_header(ds)
    except Exception as exc:
        log.warning("study header unreadable: %s", type(exc).__name__)
        return repo.StudyHeader()
    if fixes:
        log.info("study header repaired: %s", ",".join(fix.code for fix in fixes))

    def text(keyword: str, limit: int) -> str | None:
        value = str(ds.get(keyword, "") or "").strip()
        # A lone surrogate (an undecodable byte kept by a decoder) is not UTF-8 either.
        value = value.encode("utf-8", "replace").decode("utf-8")
        return value[:limit] or None

    return repo.StudyHeader(
        patient_id=text("PatientID", 64),
        accession_number=text("AccessionNumber", 16),
        study_date=parse_da(ds.get("StudyDate")),
        patient_age=text("PatientAge", 4),
    )


def _record(instance: SpooledInstance) -> repo.InstanceRecord:
    return repo.InstanceRecord(
        study_uid=require_uid(instance.study_uid, "Study Instance UID"),
        series_uid=require_uid(instance.series_uid, "Series Instance UID"),
        sop_instance_uid=require_uid(instance.sop_instance_uid, "SOP Instance UID"),
        sop_class_uid=require_uid(instance.sop_class_uid, "SOP Class UID"),
        transfer_syntax_uid=require_uid(instance.transfer_syntax_uid, "Transfer Syntax UID"),
        path=str(instance.path),
        size=int(instance.size),
        calling_aet=str(instance.calling_aet)[:16],
        received_at=instance.received_at,
    )


OUTAGE_PAUSE_SECONDS = 30.0
"""How long the per-instance database write is skipped after it failed."""


class _Outage:
    """When the database last failed the listener's per-instance write (thread-safe enough:
    one float, written whole)."""

    def __init__(self) -> None:
        self._until = 0.0

    def active(self) -> bool:
        return time.monotonic() < self._until

    def begin(self) -> None:
        self._until = time.monotonic() + OUTAGE_PAUSE_SECONDS

    def end(self) -> None:
        self._until = 0.0


class PixelsPurgedError(LookupError):
    """The study's spooled files were deleted by retention: it cannot be processed again."""


def _log_uid_conflict(instance: SpooledInstance) -> None:
    log.warning(
        "instance %s of study %s not recorded: its SOP Instance UID belongs to another study",
        instance.sop_instance_uid,
        instance.study_uid,
    )


@dataclass(frozen=True)
class Intake:
    """Listener callbacks bound to a database and a Celery app (both from one WorkerConfig)."""

    config: WorkerConfig
    app: Celery
    _outage: _Outage = field(default_factory=_Outage, init=False, compare=False, repr=False)

    def on_instance_stored(self, instance: SpooledInstance) -> None:
        """Record one spooled instance (an upsert: a repeated call changes nothing).

        Runs inside the C-STORE handler, so after a database failure it skips
        the write for :data:`OUTAGE_PAUSE_SECONDS` instead of making every
        C-STORE wait for a connect timeout: the study-ready callback records
        every instance of the study again, and is retried until it succeeds.

        Raises:
            dicom_io.uids.InvalidUIDError: when one of its UIDs is malformed.
            sqlalchemy.exc.SQLAlchemyError: when the database refuses the write.
        """
        if self._outage.active():
            return
        try:
            with session_scope(self.config.database_url) as session:
                if repo.record_instance(session, _record(instance)) is None:
                    _log_uid_conflict(instance)
        except SQLAlchemyError:
            self._outage.begin()
            raise

    def on_study_ready(self, ready: ReadyStudy) -> None:
        """Record the study as queued (a new revision when amended), then enqueue it.

        Raises:
            dicom_io.uids.InvalidUIDError: when a UID is malformed.
            sqlalchemy.exc.SQLAlchemyError: when the database refuses the write.
            kombu.exceptions.OperationalError: when the broker cannot take the
                task; the listener keeps the study pending and offers it again.
        """
        study_uid = require_uid(ready.study_uid, "Study Instance UID")
        header = read_study_header(ready.instances[0].path) if ready.instances else None
        with session_scope(self.config.database_url) as session:
            # Re-recording is an upsert: it covers instances whose per-instance
            # callback failed, and studies recovered from the spool after a restart.
            for instance in ready.instances:
                if repo.record_instance(session, _record(instance)) is None:
                    _log_uid_conflict(instance)
            study_id, revision = repo.mark_study_queued(
                session, study_uid, amended=bool(ready.amended), header=header
            )
        self._outage.end()
        self.enqueue(study_id, revision, queue=QueueName.REALTIME)
        log.info(
            "study %s ready (%s): %d instance(s), revision %d, queued",
            study_uid,
            ready.trigger,
            len(ready.instances),
            revision,
        )

    def enqueue(self, study_id: int, revision: int, *, queue: QueueName) -> None:
        """Publish ``process_study`` for one revision of a study on ``queue``.

        Raises:
            kombu.exceptions.OperationalError: when the broker cannot be reached.
        """
        self.app.send_task(PROCESS_STUDY, args=[study_id, revision], queue=QueueName(queue).value)

    def reprocess(self, study_uid: str) -> int:
        """Queue a study again on ``batch`` (e.g. after a model update); returns its id.

        Raises:
            dicom_io.uids.InvalidUIDError: when ``study_uid`` is malformed.
            LookupError: when no such study is stored.
            PixelsPurgedError: when retention deleted its spooled pixels and no
                PACS is configured to fetch them back from (a rerun would replace
                its result with "no usable image").
            kombu.exceptions.OperationalError: when the broker cannot be reached.
        """
        require_uid(study_uid, "Study Instance UID")
        with session_scope(self.config.database_url) as session:
            if self.config.pacs is None and repo.study_pixels_purged(session, study_uid):
                raise PixelsPurgedError(
                    "its spooled pixels were purged (pneumo purge) and no PACS is configured "
                    "(PNEUMO_PACS) to retrieve them from"
                )
            study_id, revision = repo.requeue_study(session, study_uid)
        self.enqueue(study_id, revision, queue=QueueName.BATCH)
        return study_id
