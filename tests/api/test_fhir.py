"""``GET /fhir/DiagnosticReport``: searches by subject, date and accession; the output
parses as valid FHIR R4 (fhir.resources) with the probability as an Observation."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from tests.api.conftest import StaffDb, bearer

pytestmark = pytest.mark.postgres


def _search(
    client: TestClient, staff_db: StaffDb, params: list[tuple[str, str]]
) -> list[DiagnosticReport]:
    response = client.get(
        "/fhir/DiagnosticReport", params=params, headers=bearer(staff_db.tokens["viewer"])
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    bundle = Bundle.model_validate_json(response.content)
    assert bundle.type == "searchset" and bundle.total == len(bundle.entry or [])
    return [DiagnosticReport.model_validate(e.resource.model_dump()) for e in bundle.entry or []]


def test_reports_validate_and_carry_the_probability(client: TestClient, staff_db: StaffDb) -> None:
    reports = _search(client, staff_db, [])
    assert len(reports) == 5  # the queued study has no result yet
    for report in reports:
        assert report.status == "preliminary"
        (observation,) = report.contained
        obs = Observation.model_validate(observation.model_dump())
        assert report.result[0].reference == f"#{obs.id}"
    by_accession = {r.identifier[0].value: r for r in reports}
    obs = Observation.model_validate(by_accession["ACC001"].contained[0].model_dump())
    assert float(obs.valueQuantity.value) == 0.91 and obs.interpretation[0].coding[0].code == "POS"
    no_usable = Observation.model_validate(by_accession["ACC006"].contained[0].model_dump())
    assert no_usable.valueQuantity is None and no_usable.dataAbsentReason is not None


def test_search_parameters(client: TestClient, staff_db: StaffDb) -> None:
    def accessions(params: list[tuple[str, str]]) -> list[str]:
        return [r.identifier[0].value for r in _search(client, staff_db, params)]

    assert accessions([("subject", "Patient/P001")]) == ["ACC004", "ACC001"]
    assert accessions([("identifier", "ACC002")]) == ["ACC002"]
    assert accessions([("identifier", "urn:x|ACC003")]) == ["ACC003"]
    assert accessions([("date", "ge2026-11-02"), ("date", "lt2026-11-04")]) == ["ACC003", "ACC002"]
    assert accessions([("date", "2026-11-06")]) == ["ACC006"]
    bad = client.get(
        "/fhir/DiagnosticReport",
        params={"date": "ap2026"},
        headers=bearer(staff_db.tokens["viewer"]),
    )
    assert bad.status_code == 400
