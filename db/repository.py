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

from sqlalchemy import delete, func, select, update
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
    WorkerHeartbeat,
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


def record_instance(session: Session, record: InstanceRecord) -> int | None:
    """Store (or refresh) one received instance; creates its study row when new.

    Returns the instance id, or None when its SOP Instance UID is already
    recorded in *another* study: a SOP Instance UID identifies one instance
    (PS3.3 §C.12.1.1.1), so a second study claiming it is refused and the
    first study keeps its instance. The check is the upsert's own ``WHERE``
    (one statement), so two studies racing for one UID cannot move the row.
    """
    study_id = ensure_study(session, record.study_uid)
    values: dict[str, Any] = {
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
    }
    dialect = session.get_bind().dialect.name
    stmt: Any = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(Instance)
    stmt = stmt.values(**values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["sop_instance_uid"],
        set_={c: stmt.excluded[c] for c in values if c not in ("study_id", "sop_instance_uid")},
        where=Instance.study_id == stmt.excluded.study_id,
    ).returning(Instance.id)
    instance_id = session.execute(stmt).scalar_one_or_none()
    return None if instance_id is None else int(instance_id)


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


def study_state(session: Session, study_id: int, *, lock: bool = False) -> StudyState | None:
    """The study's current revision and status; None when ``study_id`` is unknown.

    ``lock`` takes the row lock (``SELECT ... FOR UPDATE`` on PostgreSQL) until
    the transaction ends, so two workers starting an attempt count one after the other.
    """
    study = session.get(Study, study_id, with_for_update=lock or None)
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
                model=model.label,
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


@dataclass(frozen=True)
class PreviousSR:
    """The result SR of the newest earlier revision of a study, as recorded."""

    study_uid: str
    revision: int
    model_version: str
    """The version (e.g. ``1.0.0``) of the model that made it: part of its series UID."""
    sop_instance_uid: str
    path: str | None


def previous_sr(session: Session, study_id: int, revision: int) -> PreviousSR | None:
    """The SR of the newest revision before ``revision`` that has one; None when none does.

    A revision without an SR (no usable image) is passed over: the report
    that came before is the one a new SR replaces.
    """
    row = session.execute(
        select(
            Study.study_uid,
            Result.revision,
            ModelVersion.version,
            Result.sr_sop_instance_uid,
            Result.sr_path,
        )
        .join(Study, Study.id == Result.study_id)
        .join(ModelVersion, ModelVersion.id == Result.model_version_id)
        .where(
            Result.study_id == study_id,
            Result.revision < revision,
            Result.sr_sop_instance_uid.is_not(None),
        )
        .order_by(Result.revision.desc(), Result.id.desc())
        .limit(1)
    ).one_or_none()
    if row is None:
        return None
    study_uid, earlier, version, sop_instance_uid, path = row
    return PreviousSR(str(study_uid), int(earlier), str(version), str(sop_instance_uid), path)


def delivery_status(session: Session, delivery_id: int) -> DeliveryStatus | None:
    """The status of a delivery row; None when ``delivery_id`` is unknown."""
    status: DeliveryStatus | None = session.execute(
        select(Delivery.status).where(Delivery.id == delivery_id)
    ).scalar_one_or_none()
    return status


# --- retention (pneumo purge) ---------------------------------------------------

PIXELS_PURGED = "pixels-purged"
"""``Instance.skip_reason`` of an instance whose spooled file retention deleted."""

_PURGEABLE = (StudyStatus.DONE, StudyStatus.DEAD_LETTER)


@dataclass(frozen=True)
class PurgeCandidate:
    """A finished study old enough for retention."""

    study_id: int
    study_uid: str


def studies_to_purge(session: Session, received_before: datetime) -> list[PurgeCandidate]:
    """Studies received before ``received_before`` that are done or dead-lettered, oldest first.

    A study whose every instance row is already :data:`PIXELS_PURGED` is not
    a candidate, so a repeated purge finds nothing; a study with no instance
    row at all (its only instance was refused for reusing another study's
    SOP Instance UID) is, since its spool folder may still hold the file.
    Studies still receiving, queued or being processed are never candidates.
    """
    unpurged = (
        select(Instance.id)
        .where(
            Instance.study_id == Study.id,
            Instance.skip_reason.is_distinct_from(PIXELS_PURGED),
        )
        .exists()
    )
    any_instance = select(Instance.id).where(Instance.study_id == Study.id).exists()
    rows = session.execute(
        select(Study.id, Study.study_uid)
        .where(
            Study.status.in_(_PURGEABLE),
            Study.received_at < received_before,
            unpurged | ~any_instance,
        )
        .order_by(Study.received_at, Study.id)
    ).all()
    return [PurgeCandidate(int(study_id), str(study_uid)) for study_id, study_uid in rows]


def mark_pixels_purged(session: Session, study_id: int, sop_instance_uids: Sequence[str]) -> int:
    """Record that these instances' files are gone (skipped, :data:`PIXELS_PURGED`).

    Returns how many rows changed (rows already marked are not counted).

    Instance rows stay (results and the audit trail refer to them); only
    their selection says the pixels can no longer be read.
    """
    if not sop_instance_uids:
        return 0
    updated = session.execute(
        update(Instance)
        .where(
            Instance.study_id == study_id,
            Instance.sop_instance_uid.in_(list(sop_instance_uids)),
            Instance.skip_reason.is_distinct_from(PIXELS_PURGED),
        )
        .values(selection=SelectionStatus.SKIPPED, skip_reason=PIXELS_PURGED)
    )
    return int(getattr(updated, "rowcount", 0) or 0)


def record_retrieved_files(session: Session, study_id: int, paths: Mapping[str, str]) -> int:
    """Record where instances fetched back from the PACS now are (SOP Instance UID -> path).

    Each row gets its new path and, when retention had marked it
    :data:`PIXELS_PURGED`, its selection back to pending: the pixels are
    readable again. Returns how many rows changed.
    """
    changed = 0
    for sop_instance_uid, path in paths.items():
        updated = session.execute(
            update(Instance)
            .where(Instance.study_id == study_id, Instance.sop_instance_uid == sop_instance_uid)
            .values(path=str(path))
        )
        session.execute(
            update(Instance)
            .where(
                Instance.study_id == study_id,
                Instance.sop_instance_uid == sop_instance_uid,
                Instance.skip_reason == PIXELS_PURGED,
            )
            .values(selection=SelectionStatus.PENDING, skip_reason=None)
        )
        changed += int(getattr(updated, "rowcount", 0) or 0)
    return changed


def study_pixels_purged(session: Session, study_uid: str) -> bool:
    """True when retention deleted the spooled file of at least one of the study's instances."""
    found = session.execute(
        select(Instance.id)
        .join(Study, Instance.study_id == Study.id)
        .where(Study.study_uid == study_uid, Instance.skip_reason == PIXELS_PURGED)
        .limit(1)
    ).first()
    return found is not None


# --- work state: attempts, worker heartbeats, reconciliation ---------------------


@dataclass(frozen=True)
class RunningJob:
    """A job row still ``running``: either in progress, or its worker was lost."""

    job_id: int
    study_id: int
    revision: int
    task_id: str | None
    worker: str | None
    started_at: datetime


def running_jobs(
    session: Session, study_id: int, revision: int, kind: JobKind = JobKind.PROCESS
) -> list[RunningJob]:
    """The study's jobs of ``kind`` for ``revision`` that have no outcome yet, oldest first."""
    rows = session.execute(
        select(Job.id, Job.study_id, Job.revision, Job.task_id, Job.worker_host, Job.started_at)
        .where(
            Job.study_id == study_id,
            Job.revision == revision,
            Job.kind == kind,
            Job.status == JobStatus.RUNNING,
        )
        .order_by(Job.id)
    ).all()
    return [RunningJob(int(i), int(s), int(r), t, w, at) for i, s, r, t, w, at in rows]


def count_attempts(
    session: Session, study_id: int, revision: int, *, since: datetime | None
) -> int:
    """Processing attempts started for ``revision`` since ``since`` (the study's ``queued_at``).

    Counted from job rows, which a worker writes when it *starts* an attempt:
    an attempt whose worker was killed counts too.
    """
    stmt = select(func.count()).where(
        Job.study_id == study_id, Job.revision == revision, Job.kind == JobKind.PROCESS
    )
    if since is not None:
        stmt = stmt.where(Job.started_at >= since)
    return int(session.execute(stmt).scalar_one())


def last_job_error(session: Session, study_id: int, revision: int) -> str | None:
    """The error text of the study's latest processing job for ``revision`` that has one."""
    error: str | None = session.execute(
        select(Job.error)
        .where(
            Job.study_id == study_id,
            Job.revision == revision,
            Job.kind == JobKind.PROCESS,
            Job.error.is_not(None),
        )
        .order_by(Job.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    return error


@dataclass(frozen=True)
class Beat:
    """A worker's latest heartbeat."""

    worker: str
    beat_at: datetime
    active_tasks: frozenset[str]


def record_heartbeat(
    session: Session, worker: str, *, hostname: str, pid: int, active_tasks: Sequence[str]
) -> None:
    """Insert or refresh ``worker``'s heartbeat (now, with the task ids it is running)."""
    now = utcnow()
    values: dict[str, Any] = {
        "hostname": hostname,
        "pid": pid,
        "beat_at": now,
        "active_tasks": sorted(active_tasks),
    }
    # One writer per worker name (its own main process): update, else insert.
    updated: Any = session.execute(
        update(WorkerHeartbeat).where(WorkerHeartbeat.worker == worker).values(**values)
    )
    if updated.rowcount == 0:
        session.add(WorkerHeartbeat(worker=worker, started_at=now, **values))
        session.flush()


def remove_heartbeat(session: Session, worker: str) -> None:
    """Forget ``worker`` (its clean shutdown)."""
    session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.worker == worker))


def heartbeats(session: Session, workers: Sequence[str]) -> dict[str, Beat]:
    """The latest heartbeat of each of ``workers`` that has one."""
    if not workers:
        return {}
    rows = session.execute(
        select(WorkerHeartbeat.worker, WorkerHeartbeat.beat_at, WorkerHeartbeat.active_tasks).where(
            WorkerHeartbeat.worker.in_(sorted(set(workers)))
        )
    ).all()
    return {str(w): Beat(str(w), at, frozenset(tasks or ())) for w, at, tasks in rows}


@dataclass(frozen=True)
class WorkItem:
    """A study whose work the reconciler looks at: queued, processing or failed."""

    study_id: int
    revision: int
    status: StudyStatus
    queued_at: datetime | None
    republished_at: datetime | None
    last_job_ended_at: datetime | None
    last_job_queue: str | None


def unfinished_studies(
    session: Session, statuses: Sequence[StudyStatus], *, limit: int = 500
) -> list[WorkItem]:
    """Studies in ``statuses`` (oldest queued first), with their latest processing job's
    end time and queue for the current revision."""
    studies = session.execute(
        select(Study.id, Study.revision, Study.status, Study.queued_at, Study.republished_at)
        .where(Study.status.in_(list(statuses)), Study.revision > 0)
        .order_by(Study.queued_at, Study.id)
        .limit(limit)
    ).all()
    items: list[WorkItem] = []
    for study_id, revision, status, queued_at, republished_at in studies:
        last = session.execute(
            select(Job.ended_at, Job.queue)
            .where(Job.study_id == study_id, Job.revision == revision, Job.kind == JobKind.PROCESS)
            .order_by(Job.id.desc())
            .limit(1)
        ).one_or_none()
        ended_at, queue = (last[0], last[1]) if last is not None else (None, None)
        items.append(
            WorkItem(
                int(study_id), int(revision), status, queued_at, republished_at, ended_at, queue
            )
        )
    return items


def claim_republish(session: Session, study_id: int, revision: int, *, before: datetime) -> bool:
    """Mark the study re-published now, unless someone did so at or after ``before``.

    A compare-and-set: of several reconcilers looking at the same stale study,
    one gets True and publishes.
    """
    result: Any = session.execute(
        update(Study)
        .where(
            Study.id == study_id,
            Study.revision == revision,
            (Study.republished_at.is_(None)) | (Study.republished_at < before),
        )
        .values(republished_at=utcnow())
    )
    return bool(result.rowcount == 1)


def close_lost_jobs(session: Session, job_ids: Sequence[int], error: str) -> None:
    """Give ``running`` jobs whose worker was lost their outcome: ``retrying`` with ``error``."""
    if job_ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(list(job_ids)), Job.status == JobStatus.RUNNING)
            .values(status=JobStatus.RETRYING, ended_at=utcnow(), error=error)
        )


@dataclass(frozen=True)
class PendingDelivery:
    """A delivery not sent yet: pending, or failed with attempts left."""

    delivery_id: int
    result_id: int
    destination: str
    attempts: int


def stale_deliveries(
    session: Session, *, before: datetime, max_attempts: int, limit: int = 500
) -> list[PendingDelivery]:
    """Deliveries pending or failed, untouched since ``before``, with fewer than ``max_attempts``."""
    rows = session.execute(
        select(Delivery.id, Delivery.result_id, Delivery.destination, Delivery.attempts)
        .where(
            Delivery.status.in_([DeliveryStatus.PENDING, DeliveryStatus.FAILED]),
            Delivery.updated_at < before,
            Delivery.attempts < max_attempts,
        )
        .order_by(Delivery.updated_at)
        .limit(limit)
    ).all()
    return [PendingDelivery(int(i), int(r), str(d), int(a)) for i, r, d, a in rows]


def claim_delivery(session: Session, delivery_id: int, *, before: datetime) -> bool:
    """Touch the delivery row unless it changed at or after ``before`` (compare-and-set)."""
    result: Any = session.execute(
        update(Delivery)
        .where(
            Delivery.id == delivery_id,
            Delivery.status != DeliveryStatus.SENT,
            Delivery.updated_at < before,
        )
        .values(updated_at=utcnow())
    )
    return bool(result.rowcount == 1)


def prune_heartbeats(session: Session, *, before: datetime) -> int:
    """Delete heartbeat rows of workers silent since ``before`` (restarted or gone); how many."""
    result: Any = session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.beat_at < before))
    return int(result.rowcount or 0)
