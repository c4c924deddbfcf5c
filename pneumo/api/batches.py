"""``/api/batches``: start a reprocessing batch (role ``operator``) and follow it.

The same selectors as ``pneumo reprocess`` (:class:`db.batches.Selector`). A
batch is recorded here and published by the workers' reconcilers
(:func:`worker.batches.pump_once`), at its ``max_rate``: the request never
waits for the broker.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from db import access
from db.access import AuditAction, Permission
from db.batches import Selector, StatusChoice, batch_items, batch_views
from db.queries import DateField, Finding
from dicom_io.uids import require_uid
from pneumo.api.auth import Caller, require
from pneumo.api.context import context_of

__all__ = ["BatchRequest", "router"]

router = APIRouter(prefix="/api", tags=["batches"])


class BatchRequest(BaseModel):
    """The body of ``POST /api/batches``: selectors that combine (AND), and a rate."""

    study_uids: list[str] = Field(default_factory=list)
    since: date | None = None
    until: date | None = None
    date_field: DateField = DateField.STUDY
    status: StatusChoice | None = None
    finding: Finding | None = None
    flag: str | None = None
    model_version: str | None = None
    all: bool = False
    max_rate: float | None = Field(default=None, gt=0)

    def selector(self) -> Selector:
        """Raises: ValueError on a malformed UID or inconsistent dates."""
        return Selector(
            study_uids=tuple(dict.fromkeys(require_uid(u, "study_uids") for u in self.study_uids)),
            since=self.since,
            until=self.until,
            date_field=self.date_field,
            status=self.status,
            finding=self.finding,
            flag=self.flag or None,
            model_version=self.model_version or None,
            everything=self.all,
        )


@router.post("/batches", status_code=202, summary="Start a reprocessing batch (operator)")
def post_batch(
    request: Request, body: BatchRequest, caller: Caller = Depends(require(Permission.REPROCESS))
) -> JSONResponse:
    """Record the batch; the workers publish it on the batch queue."""
    from worker.batches import start_batch

    ctx = context_of(request)
    try:
        selector = body.selector()
        started = start_batch(
            ctx.database_url,
            selector,
            started_by=f"api:{caller.identity.user}",
            max_rate=body.max_rate,
            include_purged=ctx.retrieve_purged,
        )
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
    with ctx.session() as session:
        access.record_audit(
            session, user=caller.identity.user, role=caller.identity.role,
            action=AuditAction.REPROCESS, study_uid=None, client=caller.client,
        )  # fmt: skip
        view = batch_views(session, [started.batch_id])[0]
    body_out = view.as_dict() | {"purged": list(started.purged)}
    return JSONResponse(body_out, status_code=202, headers={"Cache-Control": "no-store"})


@router.get("/batches/{batch_id}", summary="A batch: state, counts, unfinished items")
def get_batch(
    request: Request, batch_id: int, caller: Caller = Depends(require(Permission.REPROCESS))
) -> Any:
    from db.batches import BatchItemState

    with context_of(request).session() as session:
        views = batch_views(session, [batch_id])
        if not views:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such batch")
        states = (BatchItemState.QUEUED, BatchItemState.FAILED)
        items = batch_items(session, batch_id, states=states)
    return views[0].as_dict() | {"items": [i.as_dict() for i in items]}
