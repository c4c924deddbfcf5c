"""Writes and reads of the pipeline, as plain functions on a :class:`Session`.

Every write that a redelivered task may repeat is an upsert on a natural key
(``INSERT ... ON CONFLICT DO UPDATE``, same SQL shape on SQLite and
PostgreSQL), so running it twice never creates a duplicate row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import (
    Delivery,
    DeliveryStatus,
    ImageResult,
    Instance,
    Job,
    JobKind,
    JobStatus,
    ModelVersion,
    Result,
    ResultStatus,
    SelectionStatus,
    Study,
    StudyStatus,
    utcnow,
)


def upsert(
    session: Session,
    model: type[Any],
    values: Mapping[str, Any],
    keys: Sequence[str],
    update_columns: Sequence[str] | None = None,
) -> int:
    """Insert ``values`` or, when a row with the same ``keys`` exists, update it; return its id.

    ``update_columns`` None updates every non-key column given; an empty
    sequence updates nothing (the key is re-set to itself so RETURNING still
    yields the existing id).
    """
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        stmt: Any = postgresql.insert(model).values(**values)
    elif dialect == "sqlite":
        stmt = sqlite.insert(model).values(**values)
    else:  # pragma: no cover - only the two supported databases
        raise NotImplementedError(f"upsert not implemented for {dialect}")
    columns = [c for c in values if c not in keys] if update_columns is None else update_columns
    set_ = {c: stmt.excluded[c] for c in columns} or {keys[0]: stmt.excluded[keys[0]]}
    if "updated_at" in model.__table__.c and "updated_at" not in set_:
        set_["updated_at"] = utcnow()
    stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_=set_).returning(model.id)
    return int(session.execute(stmt).scalar_one())


# --- intake (listener side) ------------------------------------------------


@dataclass(frozen=True)
class StudyHeader:
    """The few study attributes staff queries and the intended-use check need."""

    patient_id: str | None = None
    accession_number: str | None = None
    study_date: date | None = None
    patient_age: str | None = None


@dataclass(frozen=True)
class InstanceRecord:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size: int
    calling_aet: str
    received_at: datetime


def ensure_study(session: Session, study_uid: str, header: StudyHeader | None = None) -> int:
    values: dict[str, Any] = {"study_uid": study_uid, "status": StudyStatus.RECEIVING}
    if header is None:
        return upsert(session, Study, values, ["study_uid"], update_columns=[])
    values.update(
        patient_id=header.patient_id,
        accession_number=header.accession_number,
        study_date=header.study_date,
        patient_age=header.patient_age,
    )
    return upsert(
        session,
        Study,
        values,
        ["study_uid"],
        update_columns=["patient_id", "accession_number", "study_date", "patient_age"],
    )


def record_instance(session: Session, record: InstanceRecord) -> int:
    """Store (or refresh) one received instance; creates its study row when new."""
    study_id = ensure_study(session, record.study_uid)
    return upsert(
        session,
        Instance,
        {
            "study_id": study_id,
            "sop_instance_uid": record.sop_instance_uid,
            "series_uid": record.series_uid,
            "sop_class_uid": record.sop_class_uid,
            "transfer_syntax_uid": record.transfer_syntax_uid,
            "path": record.path,
            "size": record.size,
            "calling_aet": record.calling_aet,
            "received_at": record.received_at,
            # a re-sent instance is looked at again by the next run
            "selection": SelectionStatus.PENDING,
            "skip_reason": None,
        },
        ["sop_instance_uid"],
    )


def mark_study_queued(
    session: Session, study_uid: str, *, amended: bool, header: StudyHeader | None = None
) -> tuple[int, int]:
    """Record that the study is ready and about to be enqueued; return (study id, revision).

    The first dispatch is revision 1; an amended study (new instances after a
    dispatch) gets the next revision, so its result is a new row and a new SR
    rather than an overwrite.
    """
    study_id = ensure_study(session, study_uid, header)
    study = session.get(Study, study_id, with_for_update=True)
    assert study is not None
    if study.revision == 0 or amended:
        study.revision += 1
    study.status = StudyStatus.QUEUED
    study.queued_at = utcnow()
    study.completed_at = None
    session.flush()
    return study.id, study.revision


def requeue_study(session: Session, study_uid: str) -> tuple[int, int]:
    """Mark a stored study queued again (reprocessing); return (study id, revision).

    The revision is kept (a study never dispatched gets revision 1): the same
    revision run again replaces its result, as a redelivered task would.

    Raises:
        LookupError: when no study has ``study_uid``.
    """
    study = session.execute(
        select(Study).where(Study.study_uid == study_uid).with_for_update()
    ).scalar_one_or_none()
    if study is None:
        raise LookupError("no such study")
    if study.revision == 0:
        study.revision = 1
    study.status = StudyStatus.QUEUED
    study.queued_at = utcnow()
    session.flush()
    return study.id, study.revision


@dataclass(frozen=True)
class StudyState:
    """Where a study stands, as a task picking it up needs to know."""

    study_id: int
    study_uid: str
    revision: int
    status: StudyStatus
    queued_at: datetime | None


def study_state(session: Session, study_id: int) -> StudyState | None:
    """The study's current revision and status; None when ``study_id`` is unknown."""
    study = session.get(Study, study_id)
    if study is None:
        return None
    return StudyState(study.id, study.study_uid, study.revision, study.status, study.queued_at)


def set_study_status(
    session: Session,
    study_id: int,
    status: StudyStatus,
    *,
    error: str | None = None,
    revision: int | None = None,
) -> None:
    """Set the study's status; with ``revision``, only while that is still its revision
    (a task for revision 1 finishing must not mark an amended, queued revision 2 done)."""
    values: dict[str, Any] = {"status": status}
    if status is StudyStatus.DONE:
        values["completed_at"] = utcnow()
        values["last_error"] = None
    if error is not None:
        values["last_error"] = error
    stmt = update(Study).where(Study.id == study_id)
    if revision is not None:
        stmt = stmt.where(Study.revision == revision)
    session.execute(stmt.values(**values))


def set_instance_selection(
    session: Session, instance_id: int, selection: SelectionStatus, reason: str | None
) -> None:
    session.execute(
        update(Instance)
        .where(Instance.id == instance_id)
        .values(selection=selection, skip_reason=reason)
    )


# --- jobs --------------------------------------------------------------------


def start_job(
    session: Session,
    *,
    study_id: int,
    kind: JobKind,
    task_id: str | None,
    queue: str | None,
    worker_host: str | None,
    attempt: int,
    revision: int,
) -> int:
    job = Job(
        study_id=study_id,
        kind=kind,
        task_id=task_id,
        queue=queue,
        worker_host=worker_host,
        attempt=attempt,
        revision=revision,
        status=JobStatus.RUNNING,
        started_at=utcnow(),
    )
    session.add(job)
    session.flush()
    return job.id


def finish_job(session: Session, job_id: int, status: JobStatus, error: str | None = None) -> None:
    session.execute(
        update(Job).where(Job.id == job_id).values(status=status, ended_at=utcnow(), error=error)
    )


def result_study(session: Session, result_id: int) -> tuple[int, int] | None:
    """The (study id, revision) a result belongs to; None when ``result_id`` is unknown."""
    row = session.execute(
        select(Result.study_id, Result.revision).where(Result.id == result_id)
    ).one_or_none()
    return None if row is None else (int(row[0]), int(row[1]))


# --- results -----------------------------------------------------------------


def ensure_model_version(
    session: Session,
    *,
    name: str,
    version: str,
    sha256: str,
    threshold: float,
    intended_population: str = "",
    max_age_years: int | None = None,
) -> int:
    return upsert(
        session,
        ModelVersion,
        {
            "name": name,
            "version": version,
            "sha256": sha256,
            "threshold": threshold,
            "intended_population": intended_population,
            "max_age_years": max_age_years,
        },
        ["name", "version", "sha256"],
    )


@dataclass(frozen=True)
class ImageOutcome:
    instance_id: int
    probability: float
    ood_score: float
    is_chest: bool
    finding: bool
    sc_sop_instance_uid: str | None = None
    sc_path: str | None = None


@dataclass(frozen=True)
class ResultRecord:
    study_id: int
    model_version_id: int
    revision: int
    status: ResultStatus
    probability: float | None
    finding: bool | None
    threshold: float
    ood: bool
    outside_intended_use: bool
    flags: tuple[str, ...] = ()
    summary: str = ""
    sr_sop_instance_uid: str | None = None
    sr_path: str | None = None
    timings: Mapping[str, float] = field(default_factory=dict)


def save_result(session: Session, record: ResultRecord, images: Sequence[ImageOutcome]) -> int:
    """Store the result of one (study, model version, revision), replacing a previous
    attempt's row for the same key instead of adding a second one."""
    result_id = upsert(
        session,
        Result,
        {
            "study_id": record.study_id,
            "model_version_id": record.model_version_id,
            "revision": record.revision,
            "status": record.status,
            "probability": record.probability,
            "finding": record.finding,
            "threshold": record.threshold,
            "ood": record.ood,
            "outside_intended_use": record.outside_intended_use,
            "flags": list(record.flags),
            "summary": record.summary,
            "sr_sop_instance_uid": record.sr_sop_instance_uid,
            "sr_path": record.sr_path,
            "timings": {k: round(float(v), 6) for k, v in record.timings.items()},
        },
        ["study_id", "model_version_id", "revision"],
    )
    for image in images:
        upsert(
            session,
            ImageResult,
            {
                "result_id": result_id,
                "instance_id": image.instance_id,
                "probability": image.probability,
                "ood_score": image.ood_score,
                "is_chest": image.is_chest,
                "finding": image.finding,
                "sc_sop_instance_uid": image.sc_sop_instance_uid,
                "sc_path": image.sc_path,
            },
            ["result_id", "instance_id"],
        )
    return result_id


def update_timings(session: Session, result_id: int, timings: Mapping[str, float]) -> None:
    result = session.get(Result, result_id)
    if result is None:
        return
    merged = dict(result.timings or {})
    merged.update({k: round(float(v), 6) for k, v in timings.items()})
    result.timings = merged  # reassign: plain JSON columns do not track in-place changes


def ensure_delivery(session: Session, result_id: int, destination: str) -> int:
    """The delivery row for (result, destination); created pending, never reset once sent."""
    return upsert(
        session,
        Delivery,
        {"result_id": result_id, "destination": destination, "status": DeliveryStatus.PENDING},
        ["result_id", "destination"],
        update_columns=[],
    )


def record_delivery_attempt(
    session: Session, delivery_id: int, *, ok: bool, error: str | None = None
) -> None:
    values: dict[str, Any] = {
        "status": DeliveryStatus.SENT if ok else DeliveryStatus.FAILED,
        "attempts": Delivery.attempts + 1,
        "last_error": None if ok else error,
        "updated_at": utcnow(),
    }
    if ok:
        values["sent_at"] = utcnow()
    session.execute(update(Delivery).where(Delivery.id == delivery_id).values(**values))


# --- listings ------------------------------------------------------------------


@dataclass(frozen=True)
class ResultRow:
    """One line of ``pneumo results``."""

    study_uid: str
    accession_number: str | None
    study_status: str
    revision: int
    result_status: str
    finding: bool | None
    probability: float | None
    threshold: float
    model: str
    flags: tuple[str, ...]
    sr_path: str | None
    deliveries: tuple[tuple[str, str], ...]
    created_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "accession_number": self.accession_number,
            "study_status": self.study_status,
            "revision": self.revision,
            "result_status": self.result_status,
            "finding": self.finding,
            "probability": self.probability,
            "threshold": self.threshold,
            "model": self.model,
            "flags": list(self.flags),
            "sr_path": self.sr_path,
            "deliveries": {d: s for d, s in self.deliveries},
            "created_at": self.created_at.isoformat(),
        }


def recent_results(
    session: Session, *, study_uid: str | None = None, limit: int = 50
) -> list[ResultRow]:
    stmt = (
        select(Result, Study, ModelVersion)
        .join(Study, Result.study_id == Study.id)
        .join(ModelVersion, Result.model_version_id == ModelVersion.id)
        .order_by(Result.created_at.desc(), Result.id.desc())
        .limit(limit)
    )
    if study_uid is not None:
        stmt = stmt.where(Study.study_uid == study_uid)
    rows = []
    for result, study, model in session.execute(stmt).all():
        deliveries = tuple((d.destination, d.status.value) for d in result.deliveries)
        rows.append(
            ResultRow(
                study_uid=study.study_uid,
                accession_number=study.accession_number,
                study_status=study.status.value,
                revision=result.revision,
                result_status=result.status.value,
                finding=result.finding,
                probability=result.probability,
                threshold=result.threshold,
                model=f"{model.name}-{model.version}",
                flags=tuple(result.flags or ()),
                sr_path=result.sr_path,
                deliveries=deliveries,
                created_at=result.created_at,
            )
        )
    return rows


def studies_by_status(session: Session) -> dict[str, int]:
    stmt = select(Study.status, func.count()).group_by(Study.status)
    return {status.value: count for status, count in session.execute(stmt).all()}


@dataclass(frozen=True)
class ErrorRow:
    study_uid: str
    kind: str
    status: str
    attempt: int
    error: str
    at: datetime


def recent_errors(session: Session, limit: int = 10) -> list[ErrorRow]:
    stmt = (
        select(Job, Study.study_uid)
        .join(Study, Job.study_id == Study.id)
        .where(Job.error.is_not(None))
        .order_by(Job.id.desc())
        .limit(limit)
    )
    return [
        ErrorRow(
            study_uid=uid,
            kind=job.kind.value,
            status=job.status.value,
            attempt=job.attempt,
            error=job.error or "",
            at=job.ended_at or job.started_at,
        )
        for job, uid in session.execute(stmt).all()
    ]


# --- reads and writes for the pipeline stages (worker) ---


@dataclass(frozen=True)
class InstanceFile:
    """Where one received instance of a study is on disk."""

    instance_id: int
    sop_instance_uid: str
    path: str


@dataclass(frozen=True)
class StudyFiles:
    """A study's UID and its instances, in the order they were recorded."""

    study_id: int
    study_uid: str
    instances: tuple[InstanceFile, ...]


def study_files(session: Session, study_id: int) -> StudyFiles | None:
    """The study's UID and instance files; None when ``study_id`` is unknown."""
    study_uid = session.execute(
        select(Study.study_uid).where(Study.id == study_id)
    ).scalar_one_or_none()
    if study_uid is None:
        return None
    rows = session.execute(
        select(Instance.id, Instance.sop_instance_uid, Instance.path)
        .where(Instance.study_id == study_id)
        .order_by(Instance.id)
    ).all()
    instances = tuple(InstanceFile(int(i), str(uid), str(path)) for i, uid, path in rows)
    return StudyFiles(study_id, str(study_uid), instances)


def result_file_paths(session: Session, result_id: int) -> list[str] | None:
    """The files a result names: its SR (when it has one), then its SCs in image order.

    None when ``result_id`` is unknown. Whether the files exist is the caller's business.
    """
    result = session.get(Result, result_id)
    if result is None:
        return None
    paths = [result.sr_path] if result.sr_path else []
    sc_paths = session.execute(
        select(ImageResult.sc_path)
        .where(ImageResult.result_id == result_id, ImageResult.sc_path.is_not(None))
        .order_by(ImageResult.id)
    ).scalars()
    return paths + [p for p in sc_paths if p]


def delivery_status(session: Session, delivery_id: int) -> DeliveryStatus | None:
    """The status of a delivery row; None when ``delivery_id`` is unknown."""
    status: DeliveryStatus | None = session.execute(
        select(Delivery.status).where(Delivery.id == delivery_id)
    ).scalar_one_or_none()
    return status
