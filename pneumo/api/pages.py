"""The worklist page and the study page, server-rendered (Jinja2), signed in by cookie."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Form, HTTPException, Request, Response, status
from fastapi.responses import PlainTextResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from db import access
from db.access import Agreement, AuditAction, FinalLabel, Permission
from db.models import StudyStatus
from db.queries import DateField, Finding, Sort, search_studies
from pneumo.api.auth import (
    COOKIE_NAME,
    CSRF_FIELD,
    Caller,
    caller_for,
    page_caller,
)
from pneumo.api.context import context_of
from pneumo.api.studies import (
    FeedbackIn,
    StudyQuery,
    _uid,
    load_detail,
    post_reprocess,
    save_feedback,
)

__all__ = ["router", "templates"]

templates = Jinja2Templates(directory=str(Path(__file__).resolve().parent / "templates"))
router = APIRouter(include_in_schema=False)

WORKLIST_PAGE = 50
REFRESH_SECONDS = 60


def _render(request: Request, name: str, caller: Caller | None, **values: Any) -> Response:
    context = {"caller": caller, "csrf": caller.csrf if caller else "", "csrf_field": CSRF_FIELD}
    response = templates.TemplateResponse(request, name, context | values)
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get("/signin")
def signin_form(request: Request, failed: bool = False) -> Response:
    return _render(request, "signin.html", None, failed=failed)


@router.post("/signin")
def signin(request: Request, token: str = Form(...)) -> Response:
    caller = caller_for(request, token.strip(), by_cookie=True)
    if caller is None:
        return RedirectResponse("/signin?failed=1", status_code=status.HTTP_303_SEE_OTHER)
    with context_of(request).session() as session:
        access.record_audit(
            session, user=caller.identity.user, role=caller.identity.role,
            action=AuditAction.SIGN_IN, client=caller.client,
        )  # fmt: skip
    response = RedirectResponse("/", status_code=status.HTTP_303_SEE_OTHER)
    response.set_cookie(
        COOKIE_NAME, caller.token, httponly=True, samesite="strict",
        secure=request.url.scheme == "https", path="/", max_age=12 * 3600,
    )  # fmt: skip
    return response


def _check_csrf(caller: Caller, sent: str) -> None:
    if not hmac.compare_digest(sent, caller.csrf):
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="CSRF token missing or wrong")


@router.post("/signout")
def signout(caller: Caller = Depends(page_caller), csrf_token: str = Form("")) -> Response:
    _check_csrf(caller, csrf_token)
    response = RedirectResponse("/signin", status_code=status.HTTP_303_SEE_OTHER)
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict")
    return response


@router.get("/")
def worklist(
    request: Request, cursor: str | None = None, caller: Caller = Depends(page_caller)
) -> Response:
    error = None
    rows: tuple[Any, ...] = ()
    next_cursor = None
    query = StudyQuery()
    try:
        query = StudyQuery.from_form(request.query_params)
        filters = query.to_filter()
        with context_of(request).session() as session:
            page = search_studies(session, filters, sort=Sort.TRIAGE, limit=WORKLIST_PAGE,
                                  cursor=cursor, with_deliveries=False)  # fmt: skip
            access.record_audit(
                session, user=caller.identity.user, role=caller.identity.role,
                action=AuditAction.LIST_STUDIES, study_uid=filters.study_uid, client=caller.client,
            )  # fmt: skip
        rows, next_cursor = page.rows, page.next_cursor
    except ValidationError as exc:
        error = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    except ValueError as exc:
        error = str(exc)
    params = {k: v for k, v in request.query_params.items() if k != "cursor" and v}
    return _render(
        request, "worklist.html", caller, rows=rows, next_cursor=next_cursor, query=query,
        params=params, error=error, findings=list(Finding), statuses=list(StudyStatus),
        date_fields=list(DateField), refresh_seconds=REFRESH_SECONDS,
    )  # fmt: skip


@router.get("/studies/{study_uid}")
def study_page(request: Request, study_uid: str, caller: Caller = Depends(page_caller)) -> Response:
    detail, feedback = load_detail(context_of(request), caller, _uid(study_uid, "study_uid"))
    return _render(
        request, "study.html", caller, study=detail, result=detail.newest, feedback=feedback,
        can_give_feedback=caller.identity.allows(Permission.FEEDBACK),
        can_reprocess=caller.identity.allows(Permission.REPROCESS),
        queued=request.query_params.get("queued"),
        agreements=list(Agreement), labels=list(FinalLabel), saved=request.query_params.get("saved"),
    )  # fmt: skip


@router.post("/studies/{study_uid}/feedback")
def study_feedback(
    request: Request,
    study_uid: str,
    agreement: Agreement = Form(...),
    final_label: str = Form(""),
    revision: int | None = Form(None),
    csrf_token: str = Form(""),
    caller: Caller = Depends(page_caller),
) -> Response:
    _check_csrf(caller, csrf_token)
    if not caller.identity.allows(Permission.FEEDBACK):
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="only radiologists give feedback")
    study_uid = _uid(study_uid, "study_uid")
    body = FeedbackIn(
        agreement=agreement, final_label=FinalLabel(final_label) if final_label else None,
        revision=revision,
    )  # fmt: skip
    save_feedback(context_of(request), caller, study_uid, body)
    return RedirectResponse(f"/studies/{study_uid}?saved=1#feedback", status_code=303)


@router.post("/studies/{study_uid}/reprocess")
def study_reprocess(
    request: Request,
    study_uid: str,
    csrf_token: str = Form(""),
    caller: Caller = Depends(page_caller),
) -> Response:
    _check_csrf(caller, csrf_token)
    if not caller.identity.allows(Permission.REPROCESS):
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="only operators reprocess")
    post_reprocess(request, study_uid, caller)
    return RedirectResponse(f"/studies/{_uid(study_uid, 'study_uid')}?queued=1", status_code=303)


@router.get("/models/{label}/card")
def model_card(request: Request, label: str, caller: Caller = Depends(page_caller)) -> Response:
    """The model card shipped beside the weights (Markdown, shown as text)."""
    card_dir = context_of(request).model_card_dir
    if card_dir is None or "/" in label or label.startswith("."):
        raise HTTPException(status.HTTP_404_NOT_FOUND)
    card = card_dir / f"{label}.md"
    if not card.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no card for this model")
    return PlainTextResponse(card.read_text(encoding="utf-8"))
