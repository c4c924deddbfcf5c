"""``GET /fhir/DiagnosticReport``: FHIR R4 search results for the staff's systems.

Each study's newest result becomes a preliminary DiagnosticReport (the result is
UNVERIFIED until a radiologist reads the study) with the probability as a
contained Observation. Resources are built and validated with ``fhir.resources``
(its R4B models, identical to R4 for these two resources). Search parameters:
``subject`` (``Patient/<id>`` or ``<id>``: the DICOM Patient ID), ``identifier``
(``[system|]<accession>``), ``date`` (study date; ``eq``, ``ge``, ``gt``, ``le``,
``lt`` prefixes; repeatable), ``_count``.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from db import access
from db.access import AuditAction, Permission
from db.queries import MAX_PAGE_SIZE, Sort, StudyFilter, StudySummary, search_studies
from pneumo.api.auth import Caller, require
from pneumo.api.context import context_of

__all__ = ["diagnostic_report", "router"]

router = APIRouter(prefix="/fhir", tags=["fhir"])

FHIR_JSON = "application/fhir+json"
ACCESSION_TYPE = {
    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]
}
_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"


def _date_bounds(values: list[str]) -> tuple[date | None, date | None]:
    """(since, until), inclusive, from FHIR date search values.

    Raises:
        ValueError: a value that is not ``[prefix]YYYY-MM-DD`` with a supported prefix.
    """
    since: date | None = None
    until: date | None = None
    for value in values:
        prefix, day_text = (value[:2], value[2:]) if value[:2].isalpha() else ("eq", value)
        day = date.fromisoformat(day_text)
        if prefix in ("eq", "ge", "gt"):
            low = day + timedelta(days=1) if prefix == "gt" else day
            since = low if since is None else max(since, low)
        if prefix in ("eq", "le", "lt"):
            high = day - timedelta(days=1) if prefix == "lt" else day
            until = high if until is None else min(until, high)
        if prefix not in ("eq", "ge", "gt", "le", "lt"):
            raise ValueError(f"date: prefix {prefix!r} not supported")
    return since, until


def diagnostic_report(row: StudySummary) -> DiagnosticReport:
    """The validated DiagnosticReport of one study's newest result.

    Raises:
        pydantic.ValidationError: the resource would not be valid FHIR.
    """
    subject = {"identifier": {"value": row.patient_id}} if row.patient_id else None
    positive = bool(row.finding)
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "id": "probability",
        "status": "preliminary",
        "code": {"text": "Pneumonia probability (AI triage, unverified)"},
        "note": [{"text": f"model {row.model}; threshold {row.threshold}"}],
    }
    if row.probability is not None:
        observation["valueQuantity"] = {
            "value": round(row.probability, 6), "unit": "probability",
            "system": "http://unitsofmeasure.org", "code": "1",
        }  # fmt: skip
        observation["interpretation"] = [
            {"coding": [{"system": _INTERPRETATION, "code": "POS" if positive else "NEG"}]}
        ]
    else:
        observation["dataAbsentReason"] = {"text": "no usable image"}
    if subject:
        observation["subject"] = subject
    if row.finding is None:
        conclusion = "Not assessed: no usable image."
    else:
        conclusion = "Pneumonia likely" if positive else "Pneumonia probability below threshold"
        conclusion += " (AI triage aid, unverified until read by a radiologist)."
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": f"pneumo-{row.result_id}",
        "status": "preliminary",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}
        ],  # fmt: skip
        "code": {
            "coding": [
                {
                    "system": "http://loinc.org",
                    "code": "18748-4",
                    "display": "Diagnostic imaging study",
                }
            ],
            "text": "Chest X-ray pneumonia triage (AI)",
        },  # fmt: skip
        "contained": [Observation.model_validate(observation)],
        "result": [{"reference": "#probability"}],
        "imagingStudy": [
            {"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{row.study_uid}"}}
        ],  # fmt: skip
        "conclusion": conclusion,
    }
    if subject:
        report["subject"] = subject
    if row.accession_number:
        report["identifier"] = [{"type": ACCESSION_TYPE, "value": row.accession_number}]
    if row.study_date is not None:
        report["effectiveDateTime"] = row.study_date.isoformat()
    if row.result_at is not None:
        report["issued"] = row.result_at.isoformat()
    return DiagnosticReport.model_validate(report)


@router.get("/DiagnosticReport", summary="FHIR R4 search: DiagnosticReports of results")
def search_reports(
    request: Request,
    subject: str | None = None,
    identifier: str | None = None,
    date_: list[str] = Query([], alias="date"),
    count: int = Query(50, alias="_count", ge=1, le=MAX_PAGE_SIZE),
    caller: Caller = Depends(require(Permission.READ)),
) -> Response:
    try:
        since, until = _date_bounds(date_)
        filters = StudyFilter(
            patient_id=subject.removeprefix("Patient/") if subject else None,
            accession=identifier.split("|")[-1] if identifier else None,
            since=since,
            until=until,
        )
    except ValueError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=str(exc)) from exc
    ctx = context_of(request)
    with ctx.session() as session:
        page = search_studies(session, filters, sort=Sort.NEWEST, limit=count,
                              with_deliveries=False)  # fmt: skip
        access.record_audit(
            session, user=caller.identity.user, role=caller.identity.role,
            action=AuditAction.READ_FHIR, client=caller.client,
        )  # fmt: skip
    reports = [diagnostic_report(r) for r in page.rows if r.result_id is not None]
    bundle = Bundle.model_validate(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(reports),
            "entry": [
                {
                    "fullUrl": f"{str(request.base_url).rstrip('/')}/fhir/DiagnosticReport/{r.id}",
                    "resource": r,
                    "search": {"mode": "match"},
                }
                for r in reports
            ],  # fmt: skip
        }
    )
    return Response(
        bundle.model_dump_json(exclude_none=True),
        media_type=FHIR_JSON,
        headers={"Cache-Control": "no-store"},
    )
