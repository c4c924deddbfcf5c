"""``/api``: studies (search and detail), images and heatmaps, feedback, models, health.

Every response holding patient data writes one audit row, in the same
transaction as the read.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, timedelta
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from pydantic import BaseModel

from db import access
from db.access import Agreement, AuditAction, FinalLabel, Permission
from db.models import StudyStatus
from db.queries import (
    MAX_PAGE_SIZE,
    DateField,
    Finding,
    Sort,
    StudyFilter,
    image_paths,
    model_versions,
    search_studies,
    study_detail,
)
from dicom_io.pixels import PixelReadError
from dicom_io.uids import require_uid
from pneumo.api.auth import Caller, require
from pneumo.api.context import ApiContext, context_of
from pneumo.api.images import heatmap_png, instance_png

__all__ = ["StudyQuery", "router", "study_query"]

router = APIRouter(prefix="/api", tags=["studies"])

_NO_STORE = {"Cache-Control": "no-store"}  # patient data stays out of shared caches


class StudyQuery(BaseModel):
    """The search parameters of ``GET /api/studies`` and the worklist page."""

    study_uid: str | None = None
    patient_id: str | None = None
    accession: str | None = None
    since: date | None = None
    until: date | None = None
    date_field: DateField = DateField.STUDY
    finding: Finding | None = None
    status: StudyStatus | None = None
    flag: str | None = None
    min_probability: float | None = None
    model_version: str | None = None

    @classmethod
    def from_form(cls, params: Mapping[str, str]) -> StudyQuery:
        """From a GET form, where an empty field means "any".

        Raises:
            pydantic.ValidationError: a value of the wrong kind.
        """
        return cls.model_validate({k: v for k, v in params.items() if k in cls.model_fields and v})

    def to_filter(self) -> StudyFilter:
        """Raises: ValueError on a malformed UID or inconsistent bounds."""
        return StudyFilter(
            study_uid=require_uid(self.study_uid, "study_uid") if self.study_uid else None,
            patient_id=self.patient_id or None,
            accession=self.accession or None,
            since=self.since,
            until=self.until,
            date_field=self.date_field,
            finding=self.finding,
            status=self.status,
            flag=self.flag or None,
            min_probability=self.min_probability,
            model_version=self.model_version or None,
        )


def study_query(
    study_uid: str | None = None,
    patient_id: str | None = None,
    accession: str | None = None,
    since: date | None = None,
    until: date | None = None,
    date_field: DateField = DateField.STUDY,
    finding: Finding | None = None,
    status: StudyStatus | None = None,
    flag: str | None = None,
    min_probability: float | None = Query(None, ge=0.0, le=1.0),
    model_version: str | None = None,
) -> StudyQuery:
    return StudyQuery(
        study_uid=study_uid, patient_id=patient_id, accession=accession, since=since,
        until=until, date_field=date_field, finding=finding, status=status, flag=flag,
        min_probability=min_probability, model_version=model_version,
    )  # fmt: skip


def _unprocessable(exc: ValueError) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc))


def _audit(session: Any, caller: Caller, action: AuditAction, study_uid: str | None) -> None:
    access.record_audit(
        session, user=caller.identity.user, role=caller.identity.role, action=action,
        study_uid=study_uid, client=caller.client,
    )  # fmt: skip


@router.get("/studies", summary="Search studies (keyset-paginated)")
def list_studies(
    request: Request,
    query: StudyQuery = Depends(study_query),
    sort: Sort = Sort.NEWEST,
    limit: int = Query(50, ge=1, le=MAX_PAGE_SIZE),
    cursor: str | None = None,
    caller: Caller = Depends(require(Permission.READ)),
) -> Response:
    ctx = context_of(request)
    try:
        filters = query.to_filter()
        with ctx.session() as session:
            page = search_studies(session, filters, sort=sort, limit=limit, cursor=cursor)
            _audit(session, caller, AuditAction.LIST_STUDIES, filters.study_uid)
    except ValueError as exc:
        raise _unprocessable(exc) from exc
    rows = []
    for r in page.rows:
        row = r.as_dict()
        row.pop("sr_path")  # a server path: of no use to a client
        rows.append(row)
    return _json({"studies": rows, "next_cursor": page.next_cursor})


def _json(body: Any) -> Response:
    from fastapi.responses import JSONResponse

    return JSONResponse(body, headers=_NO_STORE)


def _uid(value: str, name: str) -> str:
    try:
        return require_uid(value, name)
    except ValueError as exc:
        raise _unprocessable(exc) from exc


def load_detail(ctx: ApiContext, caller: Caller, study_uid: str) -> Any:
    """The study's detail and its feedback, audited; 404 when unknown."""
    with ctx.session() as session:
        detail = study_detail(session, study_uid)
        if detail is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such study")
        feedback = access.feedback_rows(session, study_uids=[study_uid])
        _audit(session, caller, AuditAction.READ_STUDY, study_uid)
    return detail, feedback


@router.get("/studies/{study_uid}", summary="One study: results of every revision, images, skips")
def get_study(
    request: Request, study_uid: str, caller: Caller = Depends(require(Permission.READ))
) -> Response:
    detail, feedback = load_detail(context_of(request), caller, _uid(study_uid, "study_uid"))
    body = detail.as_dict()
    body["feedback"] = [f.as_dict() for f in feedback]
    return _json(body)


def _image(
    request: Request, caller: Caller, study_uid: str, sop_uid: str, heatmap: bool
) -> Response:
    ctx = context_of(request)
    study_uid, sop_uid = _uid(study_uid, "study_uid"), _uid(sop_uid, "sop_uid")
    with ctx.session() as session:
        paths = image_paths(session, study_uid, sop_uid)
        if paths is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such image in this study")
        _audit(session, caller, AuditAction.READ_HEATMAP if heatmap else AuditAction.READ_IMAGE,
               study_uid)  # fmt: skip
    instance_path, sc_path = paths
    try:
        if heatmap:
            if sc_path is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no heatmap for this image")
            png = heatmap_png(sc_path)
        else:
            png = instance_png(instance_path, max_pixels_bits=ctx.max_image_pixels_bits)
    except (OSError, ValueError, PixelReadError) as exc:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"image not readable ({type(exc).__name__})"
        ) from exc
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


@router.get("/studies/{study_uid}/images/{sop_uid}/image.png", summary="The archived image")
def get_image(
    request: Request, study_uid: str, sop_uid: str,
    caller: Caller = Depends(require(Permission.READ)),
) -> Response:  # fmt: skip
    return _image(request, caller, study_uid, sop_uid, heatmap=False)


@router.get("/studies/{study_uid}/images/{sop_uid}/heatmap.png", summary="The heatmap SC")
def get_heatmap(
    request: Request, study_uid: str, sop_uid: str,
    caller: Caller = Depends(require(Permission.READ)),
) -> Response:  # fmt: skip
    return _image(request, caller, study_uid, sop_uid, heatmap=True)


class FeedbackIn(BaseModel):
    """A radiologist's verdict; ``revision`` defaults to the study's newest result."""

    agreement: Agreement
    final_label: FinalLabel | None = None
    revision: int | None = None


def save_feedback(ctx: ApiContext, caller: Caller, study_uid: str, body: FeedbackIn) -> Any:
    """Record the verdict on the chosen (default: newest) revision; 404/409 when none."""
    with ctx.session() as session:
        detail = study_detail(session, study_uid)
        if detail is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such study")
        results = [r for r in detail.results if body.revision in (None, r.revision)]
        if not results:
            raise HTTPException(status.HTTP_409_CONFLICT, detail="no result for that revision")
        row = access.record_feedback(
            session, study_uid=study_uid, revision=results[0].revision,
            result_id=results[0].result_id, agreement=body.agreement,
            final_label=body.final_label, identity=caller.identity,
        )  # fmt: skip
        _audit(session, caller, AuditAction.GIVE_FEEDBACK, study_uid)
    return row


@router.post(
    "/studies/{study_uid}/feedback", status_code=201, summary="Agree or disagree (radiologist)"
)
def post_feedback(
    request: Request, study_uid: str, body: FeedbackIn,
    caller: Caller = Depends(require(Permission.FEEDBACK)),
) -> Response:  # fmt: skip
    row = save_feedback(context_of(request), caller, _uid(study_uid, "study_uid"), body)
    from fastapi.responses import JSONResponse

    return JSONResponse(row.as_dict(), status_code=201, headers=_NO_STORE)


@router.post(
    "/studies/{study_uid}/reprocess", status_code=202, summary="Queue a study again (operator)"
)
def post_reprocess(
    request: Request, study_uid: str, caller: Caller = Depends(require(Permission.REPROCESS))
) -> Response:
    """Queue the stored study on the batch queue (e.g. after a model update)."""
    from kombu.exceptions import OperationalError

    from worker.intake import PixelsPurgedError
    from worker.queues import QueueName

    ctx = context_of(request)
    study_uid = _uid(study_uid, "study_uid")
    if ctx.reprocess is None:  # pragma: no cover - create_app always sets it
        raise HTTPException(status.HTTP_501_NOT_IMPLEMENTED)
    try:
        ctx.reprocess(study_uid)
    except PixelsPurgedError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
    except LookupError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such study") from exc
    except OperationalError as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail=f"broker unreachable ({type(exc).__name__})"
        ) from exc
    with ctx.session() as session:
        _audit(session, caller, AuditAction.REPROCESS, study_uid)
    from fastapi.responses import JSONResponse

    return JSONResponse({"study_uid": study_uid, "queue": QueueName.BATCH.value}, status_code=202)


@router.get("/models", tags=["models"], summary="Model versions that produced results")
def get_models(request: Request, caller: Caller = Depends(require(Permission.READ))) -> Any:
    """Each version with ``active``: whether new work uses it (``pneumo models activate``)."""
    from db.models_registry import active_model

    with context_of(request).session() as session:
        active = active_model(session)
        key = None if active is None else (active.name, active.version, active.sha256)
        return [
            m.as_dict() | {"label": m.label, "active": (m.name, m.version, m.sha256) == key}
            for m in model_versions(session)
        ]


@router.get("/health", tags=["health"], summary="Database and broker reachability")
def get_health(request: Request, response: Response) -> Any:
    """No patient data and no token needed: for load balancers and monitoring."""
    from db.engine import check_connection
    from db.metrics import worker_counts

    ctx = context_of(request)
    checks: dict[str, str] = {}
    live = 0
    try:
        with ctx.session() as session:
            check_connection(session)
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        with ctx.session() as session:
            stale_after = timedelta(seconds=ctx.heartbeat_stale_seconds)
            live = worker_counts(session, stale_after=stale_after).live
        checks["workers"] = f"{live} live" if live else "none live"
    except Exception as exc:  # e.g. a database not migrated yet
        checks["workers"] = f"unknown: {type(exc).__name__}"
    checks["broker"] = _broker_check(ctx.broker_url)
    # 503 only when the API itself cannot serve (no database); no live worker or
    # no broker is "degraded": results can still be read, new studies wait.
    ok = checks["database"] == "ok"
    response.status_code = 200 if ok else 503
    healthy = ok and live > 0 and checks["broker"] == "ok"
    return {"status": "ok" if healthy else "degraded", "checks": checks}


def _broker_check(url: str) -> str:
    """Best effort: can a connection to the broker be opened within a second?"""
    try:
        from kombu import Connection

        with Connection(url, connect_timeout=1) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=1)
        return "ok"
    except Exception as exc:
        return f"unreachable: {type(exc).__name__}"
