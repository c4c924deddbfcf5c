"""Bearer tokens and roles: 401 without or with a revoked token, 403 for the wrong role,
tokens never stored in plain, CSRF on cookie-authenticated POSTs."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from tests.api.conftest import StaffDb, bearer

pytestmark = pytest.mark.postgres


@pytest.mark.parametrize(
    "path",
    ["/api/studies", "/api/models", "/api/studies/1.2.3", "/fhir/DiagnosticReport",
     "/api/studies/1.2.3/images/1.2.3.4/image.png"],
)  # fmt: skip
def test_no_token_is_401(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


def test_revoked_or_unknown_token_is_401(client: TestClient, staff_db: StaffDb) -> None:
    assert client.get("/api/studies", headers=bearer(staff_db.tokens["revoked"])).status_code == 401
    assert client.get("/api/studies", headers=bearer("pnt_made-up")).status_code == 401
    assert client.get("/api/studies", headers=bearer(staff_db.tokens["viewer"])).status_code == 200


def test_only_radiologists_give_feedback(client: TestClient, staff_db: StaffDb) -> None:
    uid = staff_db.studies[0].study_uid
    body = {"agreement": "disagree", "final_label": "other-finding"}
    for role in ("viewer", "operator", "admin"):
        response = client.post(
            f"/api/studies/{uid}/feedback", json=body, headers=bearer(staff_db.tokens[role])
        )
        assert response.status_code == 403, role
    response = client.post(
        f"/api/studies/{uid}/feedback", json=body, headers=bearer(staff_db.tokens["radiologist"])
    )
    assert response.status_code == 201
    assert response.json() | {"created_at": None} == {
        "study_uid": uid, "revision": 1, "result_id": response.json()["result_id"],
        "agreement": "disagree", "final_label": "other-finding", "user": "radiologist-user",
        "role": "radiologist", "created_at": None,
    }  # fmt: skip
    detail = client.get(f"/api/studies/{uid}", headers=bearer(staff_db.tokens["viewer"])).json()
    assert [f["agreement"] for f in detail["feedback"]] == ["disagree"]
    unprocessed = staff_db.studies[4].study_uid
    response = client.post(
        f"/api/studies/{unprocessed}/feedback",
        json=body,
        headers=bearer(staff_db.tokens["radiologist"]),
    )
    assert response.status_code == 409


def test_tokens_are_not_stored_in_plain(staff_db: StaffDb) -> None:
    engine = create_engine(staff_db.url)
    try:
        with engine.connect() as connection:
            dump = repr(connection.execute(text("SELECT * FROM api_token")).all())
    finally:
        engine.dispose()
    for token in staff_db.tokens.values():
        assert token not in dump and token.removeprefix("pnt_") not in dump


def test_cookie_session_needs_csrf_for_posts(client: TestClient, staff_db: StaffDb) -> None:
    response = client.post(
        "/signin", data={"token": staff_db.tokens["radiologist"]}, follow_redirects=False
    )
    assert response.status_code == 303
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    uid = staff_db.studies[0].study_uid
    assert client.get("/api/studies").status_code == 200  # the cookie reads
    refused = client.post(f"/api/studies/{uid}/feedback", json={"agreement": "agree"})
    assert refused.status_code == 403 and "CSRF" in refused.text
    refused = client.post(
        f"/studies/{uid}/feedback", data={"agreement": "agree", "csrf_token": "x"}
    )
    assert refused.status_code == 403
    page = client.get(f"/studies/{uid}").text
    csrf = page.split('name="csrf_token" value="')[1].split('"')[0]
    saved = client.post(f"/studies/{uid}/feedback", data={"agreement": "agree", "final_label": "pneumonia",
                        "csrf_token": csrf}, follow_redirects=False)  # fmt: skip
    assert saved.status_code == 303
    ok = client.post(
        f"/api/studies/{uid}/feedback", json={"agreement": "agree"}, headers={"X-CSRF-Token": csrf}
    )
    assert ok.status_code == 201


def test_pages_redirect_to_signin(client: TestClient, staff_db: StaffDb) -> None:
    assert client.get("/", follow_redirects=False).headers["location"] == "/signin"
    failed = client.post(
        "/signin", data={"token": staff_db.tokens["revoked"]}, follow_redirects=False
    )
    assert failed.headers["location"] == "/signin?failed=1"


def test_health_needs_no_token_and_shows_no_patient_data(client: TestClient) -> None:
    body = client.get("/api/health").json()
    assert body["checks"]["database"] == "ok" and "broker" in body["checks"]


def test_health_counts_workers_by_their_heartbeats(client: TestClient, staff_db: StaffDb) -> None:
    from db import repository as repo
    from db.engine import session_scope

    before = client.get("/api/health")
    assert before.status_code == 200  # readable without workers: degraded, not down
    assert before.json()["checks"]["workers"] == "none live"
    assert before.json()["status"] == "degraded"
    with session_scope(staff_db.url) as session:
        repo.record_heartbeat(session, "w1@host", hostname="host", pid=1, active_tasks=["t1"])
    assert client.get("/api/health").json()["checks"]["workers"] == "1 live"


def test_operators_reprocess(client: TestClient, staff_db: StaffDb, redis_server: str) -> None:
    import redis
    from sqlalchemy import select

    from db.engine import session_scope
    from db.models import Study, StudyStatus

    broker = redis.Redis.from_url(redis_server + "/15")
    broker.delete("batch")
    uid = staff_db.studies[0].study_uid
    for role in ("viewer", "radiologist", "admin"):
        assert (
            client.post(
                f"/api/studies/{uid}/reprocess", headers=bearer(staff_db.tokens[role])
            ).status_code
            == 403
        )
    operator = bearer(staff_db.tokens["operator"])
    assert client.post("/api/studies/1.2.3/reprocess", headers=operator).status_code == 404
    response = client.post(f"/api/studies/{uid}/reprocess", headers=operator)
    assert response.status_code == 202 and response.json() == {"study_uid": uid, "queue": "batch"}
    with session_scope(staff_db.url) as s:
        assert (
            s.execute(select(Study.status).where(Study.study_uid == uid)).scalar_one()
            is StudyStatus.QUEUED
        )
    assert broker.llen("batch") == 1
    broker.delete("batch")
