"""The staff's study search and study detail: the one query behind ``pneumo results``,
``GET /api/studies``, the worklist page and the FHIR reports.

A row is a study with its *newest* result (highest result id: the latest revision,
or the latest model run of it), or with none when it has not been processed yet.
Pages are keyset-paginated: a page ends with an opaque cursor that the next
request hands back, so paging stays fast and stable while new studies arrive.
"""

from __future__ import annotations

import base64
import enum
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Float, String, and_, cast, func, literal, or_, select, true, tuple_
from sqlalchemy.orm import Session, aliased, joinedload, selectinload
from sqlalchemy.sql.elements import ColumnElement

from db.models import (
    Delivery,
    ImageResult,
    Instance,
    ModelVersion,
    Result,
    ResultStatus,
    SelectionStatus,
    Study,
    StudyStatus,
    model_label,
)

__all__ = [
    "DateField",
    "DeliveryView",
    "Finding",
    "HistoryRow",
    "ImageView",
    "InstanceView",
    "MAX_PAGE_SIZE",
    "ModelView",
    "Page",
    "ResultView",
    "Sort",
    "StudyDetail",
    "StudyFilter",
    "StudySummary",
    "image_paths",
    "model_version_matches",
    "model_versions",
    "search_studies",
    "study_detail",
    "study_history",
]

MAX_PAGE_SIZE = 500


class Finding(str, enum.Enum):
    """The finding filter, in the staff's words."""

    PNEUMONIA = "pneumonia"
    """The newest result is above the threshold."""
    NORMAL = "normal"
    """The newest result is below the threshold."""
    NOT_PROCESSED = "not-processed"
    """No result yet, or no usable image in it."""


class Sort(str, enum.Enum):
    """The order of a search."""

    NEWEST = "newest"
    """Most recently received first."""
    PROBABILITY = "probability"
    """Highest probability first; unprocessed studies last."""
    TRIAGE = "triage"
    """Pneumonia-likely first, then most recently received (the worklist)."""


class DateField(str, enum.Enum):
    """Which date ``since``/``until`` bound."""

    STUDY = "study"
    """The Study Date of the DICOM header."""
    RECEIVED = "received"
    """When the study reached pneumo."""


@dataclass(frozen=True)
class StudyFilter:
    """Every filter of the staff search; None means "any"."""

    study_uid: str | None = None
    patient_id: str | None = None
    accession: str | None = None
    since: date | None = None
    until: date | None = None  # inclusive
    date_field: DateField = DateField.STUDY
    finding: Finding | None = None
    status: StudyStatus | None = None
    flag: str | None = None
    min_probability: float | None = None
    model_version: str | None = None  # "1.0.0" or "pneumonet-1.0.0"

    def __post_init__(self) -> None:
        if self.min_probability is not None and not 0.0 <= self.min_probability <= 1.0:
            raise ValueError("min_probability: must be between 0 and 1")
        if self.since and self.until and self.since > self.until:
            raise ValueError("since: must not be after until")


@dataclass(frozen=True)
class StudySummary:
    """One row of a search: the study and its newest result (None fields when unprocessed)."""

    study_uid: str
    patient_id: str | None
    accession_number: str | None
    study_date: date | None
    received_at: datetime
    study_status: StudyStatus
    revision: int
    result_id: int | None
    result_status: ResultStatus | None
    finding: bool | None
    probability: float | None
    threshold: float | None
    flags: tuple[str, ...]
    model: str | None
    sr_path: str | None
    result_at: datetime | None
    deliveries: tuple[tuple[str, str], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "patient_id": self.patient_id,
            "accession_number": self.accession_number,
            "study_date": None if self.study_date is None else self.study_date.isoformat(),
            "received_at": self.received_at.isoformat(),
            "study_status": self.study_status.value,
            "revision": self.revision,
            "result_status": None if self.result_status is None else self.result_status.value,
            "finding": self.finding,
            "probability": self.probability,
            "threshold": self.threshold,
            "flags": list(self.flags),
            "model": self.model,
            "sr_path": self.sr_path,
            "result_at": None if self.result_at is None else self.result_at.isoformat(),
            "deliveries": dict(self.deliveries),
        }


@dataclass(frozen=True)
class Page:
    """One page of a search; ``next_cursor`` None on the last page."""

    rows: tuple[StudySummary, ...]
    next_cursor: str | None


# Study ids grow in the order studies are received (the row is created with its
# first instance, and received_at is that moment), so "newest first" is id order,
# served by the primary key: no sort of the whole table on any page.


def _newest_result(session: Session) -> tuple[Any, ColumnElement[bool]]:
    """The study's newest result as a join target and its join condition.

    PostgreSQL: a LATERAL subquery (one index lookup per study row actually
    read, so a page stops after ``limit`` rows). SQLite has no LATERAL: the
    result whose id is the study's highest, by a correlated subquery.
    """
    if session.get_bind().dialect.name == "postgresql":
        newest = (
            select(Result)
            .where(Result.study_id == Study.id)
            .order_by(Result.id.desc())
            .limit(1)
            .lateral("newest_result")
        )
        return aliased(Result, newest), true()
    newest_id = (
        select(func.max(Result.id))
        .where(Result.study_id == Study.id)
        .correlate(Study)
        .scalar_subquery()
    )
    return Result, Result.id == newest_id


def _sort_keys(sort: Sort, r: Any) -> list[Any]:
    """The ORDER BY of one query (all descending); TRIAGE runs as two NEWEST segments."""
    if sort is Sort.PROBABILITY:
        return [cast(func.coalesce(r.probability, literal(-1.0)), Float), Study.id]
    return [Study.id]


def _encode_cursor(values: Sequence[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(values)).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, sort: Sort) -> list[Any]:
    """The sort-key values a cursor holds: [id], [probability, id] or [segment, id].

    Raises:
        ValueError: the cursor is not one this sort produced.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = json.loads(raw)
        if not isinstance(values, list) or len(values) != (1 if sort is Sort.NEWEST else 2):
            raise ValueError
        if sort is Sort.PROBABILITY:
            return [float(values[0]), int(values[1])]
        if sort is Sort.TRIAGE and values[0] not in (0, 1):
            raise ValueError
        return [int(v) for v in values]
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError("cursor: not a cursor of this search") from exc


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def _conditions(f: StudyFilter, r: Any) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if f.study_uid is not None:
        where.append(Study.study_uid == f.study_uid)
    if f.patient_id is not None:
        where.append(Study.patient_id == f.patient_id)
    if f.accession is not None:
        where.append(Study.accession_number == f.accession)
    if f.date_field is DateField.STUDY:
        if f.since is not None:
            where.append(Study.study_date >= f.since)
        if f.until is not None:
            where.append(Study.study_date <= f.until)
    else:
        if f.since is not None:
            where.append(Study.received_at >= _day_start(f.since))
        if f.until is not None:
            where.append(Study.received_at < _day_start(f.until + timedelta(days=1)))
    if f.finding is Finding.PNEUMONIA:
        where.append(r.finding.is_(True))
    elif f.finding is Finding.NORMAL:
        where.append(r.finding.is_(False))
    elif f.finding is Finding.NOT_PROCESSED:
        where.append(r.finding.is_(None))  # no result row, or no usable image
    if f.status is not None:
        where.append(Study.status == f.status)
    if f.flag is not None:
        # flags is a JSON list of codes: match the quoted code in its text form
        where.append(cast(r.flags, String).like(f'%"{_like_escape(f.flag)}"%', escape="\\"))
    if f.min_probability is not None:
        where.append(r.probability >= f.min_probability)
    if f.model_version is not None:
        where.append(model_version_matches(f.model_version))
    return where


def model_version_matches(label: str) -> ColumnElement[bool]:
    """The model versions ``label`` names: "1.0.0" or "pneumonet-1.0.0"."""
    return or_(
        ModelVersion.version == label,
        (ModelVersion.name + "-" + ModelVersion.version) == label,
    )


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _page_query(
    session: Session,
    filters: StudyFilter,
    sort: Sort,
    *,
    extra: Callable[[Any], Sequence[ColumnElement[bool]]] | None,
    after: Sequence[Any] | None,
    limit: int,
) -> list[Any]:
    r, on = _newest_result(session)
    keys = _sort_keys(sort, r)
    stmt = (
        select(
            Study.id,
            Study.study_uid,
            Study.patient_id,
            Study.accession_number,
            Study.study_date,
            Study.received_at,
            Study.status,
            Study.revision,
            r.id,
            r.status,
            r.finding,
            r.probability,
            r.threshold,
            r.flags,
            ModelVersion.name,
            ModelVersion.version,
            r.sr_path,
            r.created_at,
            *keys,
        )  # fmt: skip
        .select_from(Study)
        .outerjoin(r, on)
        .outerjoin(ModelVersion, ModelVersion.id == r.model_version_id)
        .where(and_(true(), *_conditions(filters, r), *(extra(r) if extra else ())))
        .order_by(*(k.desc() for k in keys))
        .limit(limit)
    )
    if after is not None:
        stmt = stmt.where(tuple_(*keys) < tuple_(*after))
    return list(session.execute(stmt).all())


def search_studies(
    session: Session,
    filters: StudyFilter = StudyFilter(),
    *,
    sort: Sort = Sort.NEWEST,
    limit: int = 50,
    cursor: str | None = None,
    with_deliveries: bool = True,
) -> Page:
    """Studies matching ``filters`` in ``sort`` order, ``limit`` at a time after ``cursor``.

    Raises:
        ValueError: ``limit`` outside 1..MAX_PAGE_SIZE, or a cursor this search did not make.
    """
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"limit: must be between 1 and {MAX_PAGE_SIZE}")
    after = None if cursor is None else _decode_cursor(cursor, sort)
    if sort is Sort.TRIAGE:
        # pneumonia-likely studies newest first, then all the others newest first
        segments: list[tuple[int, Callable[[Any], Sequence[ColumnElement[bool]]]]] = [
            (1, lambda r: [r.finding.is_(True)]),
            (0, lambda r: [or_(r.finding.is_(False), r.finding.is_(None))]),
        ]
        rows: list[Any] = []
        keyed: list[list[Any]] = []
        for segment, condition in segments:
            if after is not None and segment > after[0]:
                continue
            seg_after = [after[1]] if after is not None and segment == after[0] else None
            got = _page_query(session, filters, Sort.NEWEST, extra=condition, after=seg_after,
                              limit=limit + 1 - len(rows))  # fmt: skip
            rows += got
            keyed += [[segment, row[0]] for row in got]
            if len(rows) > limit:
                break
    else:
        rows = _page_query(session, filters, sort, extra=None, after=after, limit=limit + 1)
        keyed = [list(row[18:]) for row in rows]
    more = len(rows) > limit
    rows = rows[:limit]
    ids = [r[8] for r in rows if r[8] is not None]
    deliveries = _deliveries(session, ids) if with_deliveries else {}
    summaries = tuple(
        StudySummary(
            study_uid=r[1],
            patient_id=r[2],
            accession_number=r[3],
            study_date=r[4],
            received_at=r[5],
            study_status=r[6],
            revision=r[7],
            result_id=r[8],
            result_status=r[9],
            finding=r[10],
            probability=r[11],
            threshold=r[12],
            flags=tuple(r[13] or ()),
            model=None if r[14] is None else f"{r[14]}-{r[15]}",
            sr_path=r[16],
            result_at=r[17],
            deliveries=tuple(deliveries.get(r[8], ())),
        )
        for r in rows
    )
    next_cursor = _encode_cursor(keyed[limit - 1]) if more else None
    return Page(summaries, next_cursor)


def _deliveries(session: Session, result_ids: list[int]) -> dict[int, list[tuple[str, str]]]:
    """Delivery (destination, status) pairs of each result, in one query."""
    by_result: dict[int, list[tuple[str, str]]] = {}
    if not result_ids:
        return by_result
    stmt = (
        select(Delivery.result_id, Delivery.destination, Delivery.status)
        .where(Delivery.result_id.in_(result_ids))
        .order_by(Delivery.id)
    )
    for result_id, destination, status in session.execute(stmt).all():
        by_result.setdefault(result_id, []).append((destination, status.value))
    return by_result


# --- one study ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelView:
    """A model version as staff see it."""

    name: str
    version: str
    sha256: str
    threshold: float
    intended_population: str
    max_age_years: int | None

    @property
    def label(self) -> str:
        return model_label(self.name, self.version)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "threshold": self.threshold,
            "intended_population": self.intended_population,
            "max_age_years": self.max_age_years,
        }


@dataclass(frozen=True)
class InstanceView:
    """A received instance: selected for the model, or skipped and why."""

    sop_instance_uid: str
    series_uid: str
    selection: SelectionStatus
    skip_reason: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "series_uid": self.series_uid,
            "selection": self.selection.value,
            "skip_reason": self.skip_reason,
        }


@dataclass(frozen=True)
class ImageView:
    """The model's answer for one image of a result."""

    sop_instance_uid: str
    probability: float
    ood_score: float
    is_chest: bool
    finding: bool
    sc_sop_instance_uid: str | None
    has_heatmap: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "probability": self.probability,
            "ood_score": self.ood_score,
            "is_chest": self.is_chest,
            "finding": self.finding,
            "sc_sop_instance_uid": self.sc_sop_instance_uid,
            "has_heatmap": self.has_heatmap,
        }


@dataclass(frozen=True)
class DeliveryView:
    destination: str
    status: str
    attempts: int
    last_error: str | None
    sent_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "status": self.status,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "sent_at": None if self.sent_at is None else self.sent_at.isoformat(),
        }


@dataclass(frozen=True)
class ResultView:
    """One result of a study (one revision, one model run)."""

    result_id: int
    revision: int
    status: ResultStatus
    probability: float | None
    finding: bool | None
    threshold: float
    ood: bool
    outside_intended_use: bool
    flags: tuple[str, ...]
    summary: str
    sr_sop_instance_uid: str | None
    timings: dict[str, float]
    created_at: datetime
    model: ModelView
    images: tuple[ImageView, ...]
    deliveries: tuple[DeliveryView, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "result_id": self.result_id,
            "revision": self.revision,
            "status": self.status.value,
            "probability": self.probability,
            "finding": self.finding,
            "threshold": self.threshold,
            "ood": self.ood,
            "outside_intended_use": self.outside_intended_use,
            "flags": list(self.flags),
            "summary": self.summary,
            "sr_sop_instance_uid": self.sr_sop_instance_uid,
            "timings": self.timings,
            "created_at": self.created_at.isoformat(),
            "model": self.model.as_dict(),
            "images": [i.as_dict() for i in self.images],
            "deliveries": [d.as_dict() for d in self.deliveries],
        }


@dataclass(frozen=True)
class StudyDetail:
    """Everything staff may see of one study; ``results`` newest first."""

    study_uid: str
    patient_id: str | None
    accession_number: str | None
    study_date: date | None
    patient_age: str | None
    status: StudyStatus
    revision: int
    received_at: datetime
    completed_at: datetime | None
    instances: tuple[InstanceView, ...]
    results: tuple[ResultView, ...] = field(default=())

    @property
    def newest(self) -> ResultView | None:
        return self.results[0] if self.results else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "patient_id": self.patient_id,
            "accession_number": self.accession_number,
            "study_date": None if self.study_date is None else self.study_date.isoformat(),
            "patient_age": self.patient_age,
            "status": self.status.value,
            "revision": self.revision,
            "received_at": self.received_at.isoformat(),
            "completed_at": None if self.completed_at is None else self.completed_at.isoformat(),
            "instances": [i.as_dict() for i in self.instances],
            "results": [r.as_dict() for r in self.results],
        }


def _model_view(m: ModelVersion) -> ModelView:
    return ModelView(m.name, m.version, m.sha256, m.threshold, m.intended_population,
                     m.max_age_years)  # fmt: skip


def study_detail(session: Session, study_uid: str) -> StudyDetail | None:
    """The whole record of one study; None when no study has ``study_uid``."""
    study = session.execute(
        select(Study)
        .where(Study.study_uid == study_uid)
        .options(
            selectinload(Study.instances),
            selectinload(Study.results).options(
                joinedload(Result.model_version),
                selectinload(Result.images),
                selectinload(Result.deliveries),
            ),
        )
    ).scalar_one_or_none()
    if study is None:
        return None
    uids = {i.id: i.sop_instance_uid for i in study.instances}
    results = sorted(study.results, key=lambda r: r.id, reverse=True)
    return StudyDetail(
        study_uid=study.study_uid,
        patient_id=study.patient_id,
        accession_number=study.accession_number,
        study_date=study.study_date,
        patient_age=study.patient_age,
        status=study.status,
        revision=study.revision,
        received_at=study.received_at,
        completed_at=study.completed_at,
        instances=tuple(
            InstanceView(i.sop_instance_uid, i.series_uid, i.selection, i.skip_reason)
            for i in study.instances
        ),
        results=tuple(
            ResultView(
                result_id=r.id,
                revision=r.revision,
                status=r.status,
                probability=r.probability,
                finding=r.finding,
                threshold=r.threshold,
                ood=r.ood,
                outside_intended_use=r.outside_intended_use,
                flags=tuple(r.flags or ()),
                summary=r.summary,
                sr_sop_instance_uid=r.sr_sop_instance_uid,
                timings={k: float(v) for k, v in (r.timings or {}).items()},
                created_at=r.created_at,
                model=_model_view(r.model_version),
                images=tuple(
                    ImageView(
                        uids.get(i.instance_id, ""),
                        i.probability,
                        i.ood_score,
                        i.is_chest,
                        i.finding,
                        i.sc_sop_instance_uid,
                        bool(i.sc_path),
                    )
                    for i in r.images
                ),  # fmt: skip
                deliveries=tuple(
                    DeliveryView(d.destination, d.status.value, d.attempts, d.last_error, d.sent_at)
                    for d in r.deliveries
                ),
            )
            for r in results
        ),
    )


def image_paths(
    session: Session, study_uid: str, sop_instance_uid: str
) -> tuple[str, str | None] | None:
    """Where an instance of the study is archived and where its newest heatmap SC is.

    None when the study has no such instance.
    """
    row = session.execute(
        select(Instance.id, Instance.path)
        .join(Study, Instance.study_id == Study.id)
        .where(Study.study_uid == study_uid, Instance.sop_instance_uid == sop_instance_uid)
    ).one_or_none()
    if row is None:
        return None
    sc_path = session.execute(
        select(ImageResult.sc_path)
        .where(ImageResult.instance_id == row[0], ImageResult.sc_path.is_not(None))
        .order_by(ImageResult.result_id.desc())
        .limit(1)
    ).scalar_one_or_none()
    return str(row[1]), sc_path


def model_versions(session: Session) -> list[ModelView]:
    """Every model version that produced results, newest first."""
    stmt = select(ModelVersion).order_by(ModelVersion.id.desc())
    return [_model_view(m) for m in session.execute(stmt).scalars()]


# --- every revision -------------------------------------------------------------------


@dataclass(frozen=True)
class HistoryRow:
    """One result of a study in its history (one revision, one model run)."""

    study_uid: str
    patient_id: str | None
    accession_number: str | None
    study_date: date | None
    result_id: int
    revision: int
    result_status: ResultStatus
    finding: bool | None
    probability: float | None
    threshold: float
    flags: tuple[str, ...]
    model: str
    created_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "patient_id": self.patient_id,
            "accession_number": self.accession_number,
            "study_date": None if self.study_date is None else self.study_date.isoformat(),
            "result_id": self.result_id,
            "revision": self.revision,
            "result_status": self.result_status.value,
            "finding": self.finding,
            "probability": self.probability,
            "threshold": self.threshold,
            "flags": list(self.flags),
            "model": self.model,
            "created_at": self.created_at.isoformat(),
        }


def study_history(
    session: Session,
    filters: StudyFilter = StudyFilter(),
    *,
    sort: Sort = Sort.NEWEST,
    limit: int = 50,
) -> list[HistoryRow]:
    """Every result of the studies :func:`search_studies` finds (its first ``limit``
    studies, in ``sort`` order): per study, newest revision first (then newest run).

    The filters select studies exactly as the search does (on each study's newest
    result); the history then lists all of the study's results. Unprocessed
    studies have no rows.

    Raises:
        ValueError: ``limit`` outside 1..MAX_PAGE_SIZE.
    """
    page = search_studies(session, filters, sort=sort, limit=limit, with_deliveries=False)
    order = {row.study_uid: n for n, row in enumerate(page.rows)}
    if not order:
        return []
    stmt = (
        select(Study, Result, ModelVersion)
        .join(Result, Result.study_id == Study.id)
        .join(ModelVersion, ModelVersion.id == Result.model_version_id)
        .where(Study.study_uid.in_(list(order)))
        .order_by(Result.revision.desc(), Result.id.desc())
    )
    rows = [
        HistoryRow(
            study_uid=study.study_uid,
            patient_id=study.patient_id,
            accession_number=study.accession_number,
            study_date=study.study_date,
            result_id=result.id,
            revision=result.revision,
            result_status=result.status,
            finding=result.finding,
            probability=result.probability,
            threshold=result.threshold,
            flags=tuple(result.flags or ()),
            model=model.label,
            created_at=result.created_at,
        )
        for study, result, model in session.execute(stmt).all()
    ]
    return sorted(rows, key=lambda r: order[r.study_uid])  # stable: revisions stay in order
