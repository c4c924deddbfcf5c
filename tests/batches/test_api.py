"""``POST /api/batches`` (role operator) and ``GET /api/batches/{id}`` on the seeded staff DB."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from db.engine import session_scope
from db.models import Study
from tests.api.conftest import StaffDb, app_for, bearer, staff_db  # noqa: F401

pytestmark = pytest.mark.postgres


def test_operators_start_and_follow_a_batch(staff_db: StaffDb) -> None:  # noqa: F811
    with session_scope(staff_db.url) as session:
        before = {s.id: (s.status, s.revision) for s in session.query(Study)}
    uid = staff_db.studies[0].study_uid
    with TestClient(app_for(staff_db)) as client:
        for role in ("viewer", "radiologist", "admin"):
            response = client.post("/api/batches", json={"all": True},
                                   headers=bearer(staff_db.tokens[role]))  # fmt: skip
            assert response.status_code == 403
        operator = bearer(staff_db.tokens["operator"])
        assert client.post("/api/batches", json={}, headers=operator).status_code == 422
        bad = {"study_uids": ["not a uid"]}
        assert client.post("/api/batches", json=bad, headers=operator).status_code == 422
        response = client.post(
            "/api/batches", json={"study_uids": [uid], "max_rate": 2}, headers=operator
        )
        assert response.status_code == 202, response.text
        batch = response.json()
        assert batch["started_by"] == "api:operator-user" and batch["total"] == 1
        assert batch["state"] == "queued" and batch["max_rate"] == 2.0

        shown = client.get(f"/api/batches/{batch['id']}", headers=operator).json()
        assert shown["counts"]["queued"] == 1 and shown["items"][0]["study_uid"] == uid
        assert client.get("/api/batches/999", headers=operator).status_code == 404
    with session_scope(staff_db.url) as session:  # recorded, not yet published
        assert {s.id: (s.status, s.revision) for s in session.query(Study)} == before
