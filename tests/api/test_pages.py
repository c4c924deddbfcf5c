"""The server-rendered pages without a browser: filters kept and checked, paging, roles,
sign-out guarded by CSRF, the model card, the security headers."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import StaffDb

pytestmark = pytest.mark.postgres


def _sign_in(client: TestClient, token: str) -> None:
    assert client.post("/signin", data={"token": token}, follow_redirects=False).status_code == 303


def test_worklist_filters_and_errors(client: TestClient, staff_db: StaffDb) -> None:
    _sign_in(client, staff_db.tokens["viewer"])
    page = client.get("/", params={"accession": "ACC003", "finding": "", "status": ""})
    assert page.status_code == 200
    assert 'value="ACC003"' in page.text and page.text.count("/studies/") == 1
    assert page.headers["cache-control"] == "no-store"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    bad = client.get("/", params={"min_probability": "lots"})
    assert bad.status_code == 200 and 'role="alert"' in bad.text and "min_probability" in bad.text


def test_worklist_pages(
    client: TestClient, staff_db: StaffDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pneumo.api import pages

    monkeypatch.setattr(pages, "WORKLIST_PAGE", 4)
    _sign_in(client, staff_db.tokens["viewer"])
    first = client.get("/", params={"patient_id": ""}).text
    assert first.count('href="/studies/') == 4 and "Next page" in first
    link = first.split('<a href="/?')[1].split('"')[0].replace("&amp;", "&")
    second = client.get("/?" + link).text
    assert second.count('href="/studies/') == 2 and "Next page" not in second


def test_roles_on_the_study_page(client: TestClient, staff_db: StaffDb) -> None:
    uid = staff_db.studies[0].study_uid
    _sign_in(client, staff_db.tokens["viewer"])
    viewer_page = client.get(f"/studies/{uid}").text
    assert "Save feedback" not in viewer_page and "Reprocess" not in viewer_page
    assert client.post(f"/studies/{uid}/feedback", data={"agreement": "agree"}).status_code == 403
    _sign_in(client, staff_db.tokens["operator"])
    assert "Reprocess this study" in client.get(f"/studies/{uid}").text
    _sign_in(client, staff_db.tokens["radiologist"])
    assert "Save feedback" in client.get(f"/studies/{uid}").text


def test_signout_needs_csrf(client: TestClient, staff_db: StaffDb) -> None:
    _sign_in(client, staff_db.tokens["viewer"])
    assert client.post("/signout", data={"csrf_token": "forged"}).status_code == 403
    csrf = client.get("/").text.split('name="csrf_token" value="')[1].split('"')[0]
    out = client.post("/signout", data={"csrf_token": csrf}, follow_redirects=False)
    assert out.status_code == 303 and 'pneumo_session=""' in out.headers["set-cookie"]


def test_model_card(client: TestClient, staff_db: StaffDb) -> None:
    from pneumo.api.app import _model_card_dir

    _sign_in(client, staff_db.tokens["viewer"])
    cards = sorted((_model_card_dir() or pytest.skip("no model package")).glob("*.md"))
    if not cards:
        pytest.skip("no model card shipped")
    assert client.get(f"/models/{cards[0].stem}/card").status_code == 200
    assert client.get("/models/no-such-model/card").status_code == 404
