"""The listener's side of the pipeline: record what arrived, enqueue what is ready.

:class:`Intake` supplies the two callbacks of :class:`dicom_io.listener.Listener`.
Order matters for no loss: the study is committed to the database *before* its
task is published, and a failure to publish raises, so the listener keeps the
study pending and offers it again later (its contract) instead of dropping it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pydicom

from db import repository as repo
from db.engine import session_scope
from db.models import Study, StudyStatus, utcnow
from dicom_io.uids import require_uid
from pneumo.settings import Settings
from worker.intended_use import parse_da
from worker.tasks import PROCESS_STUDY

log = logging.getLogger(__name__)

REALTIME = "realtime"
BATCH = "batch"
_HEADER_TAGS = ["PatientID", "AccessionNumber", "StudyDate", "PatientAge"]


def read_study_header(path: Any) -> repo.StudyHeader:
    """The staff-query attributes of a study, from one of its files (no pixel data read)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=True)
    except Exception as exc:
        log.warning("study header unreadable: %s", type(exc).__name__)
        return repo.StudyHeader()

    def text(keyword: str, limit: int) -> str | None:
        value = str(ds.get(keyword, "") or "").strip()
        return value[:limit] or None

    return repo.StudyHeader(
        patient_id=text("PatientID", 64),
        accession_number=text("AccessionNumber", 16),
        study_date=parse_da(ds.get("StudyDate")),
        patient_age=text("PatientAge", 4),
    )


def _record(instance: Any) -> repo.InstanceRecord:
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


@dataclass
class Intake:
    """Listener callbacks bound to a database and a Celery app."""

    settings: Settings
    app: Any  # celery.Celery

    @property
    def url(self) -> str:
        return self.settings.effective_database_url

    def on_instance_stored(self, instance: Any) -> None:
        with session_scope(self.url) as session:
            repo.record_instance(session, _record(instance))

    def on_study_ready(self, ready: Any) -> None:
        study_uid = require_uid(ready.study_uid, "Study Instance UID")
        header = read_study_header(ready.instances[0].path) if ready.instances else None
        with session_scope(self.url) as session:
            # Re-recording is an upsert: it covers instances whose per-instance
            # callback failed, and studies recovered from the spool after a restart.
            for instance in ready.instances:
                repo.record_instance(session, _record(instance))
            study_id, revision = repo.mark_study_queued(
                session, study_uid, amended=bool(ready.amended), header=header
            )
        self.enqueue(study_id, revision, queue=REALTIME)
        log.info(
            "study %s ready (%s): %d instance(s), revision %d, queued",
            study_uid, ready.trigger, len(ready.instances), revision,
        )

    def enqueue(self, study_id: int, revision: int, *, queue: str) -> None:
        self.app.send_task(PROCESS_STUDY, args=[study_id, revision], queue=queue)

    def reprocess(self, study_uid: str) -> int:
        """Queue a study again on ``batch`` (e.g. after a model update); returns its id."""
        require_uid(study_uid, "Study Instance UID")
        with session_scope(self.url) as session:
            study = session.query(Study).filter(Study.study_uid == study_uid).one_or_none()
            if study is None:
                raise LookupError("no such study")
            if study.revision == 0:
                study.revision = 1
            study.status = StudyStatus.QUEUED
            study.queued_at = utcnow()
            study_id, revision = study.id, study.revision
        self.enqueue(study_id, revision, queue=BATCH)
        return study_id
