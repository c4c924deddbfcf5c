"""``/api/studies`` and the ``results`` command: the same filters give the same rows;
detail, images, models; one audit row for every read of patient data."""

from __future__ import annotations

import argparse
import io
import json
from contextlib import redirect_stdout

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from db import access
from db.engine import session_scope
from pneumo.commands import staff
from tests.api.conftest import StaffDb, bearer

pytestmark = pytest.mark.postgres

# (CLI arguments, the same filters as API query parameters)
FILTERS = [
    ([], {}),
    (["--patient-id", "P001"], {"patient_id": "P001"}),
    (["--accession", "ACC003"], {"accession": "ACC003"}),
    (
        ["--since", "2026-11-02", "--until", "2026-11-04"],
        {"since": "2026-11-02", "until": "2026-11-04"},
    ),
    (
        ["--since", "2026-11-20", "--date-field", "received"],
        {"since": "2026-11-20", "date_field": "received"},
    ),
    (["--finding", "pneumonia"], {"finding": "pneumonia"}),
    (["--finding", "normal"], {"finding": "normal"}),
    (["--finding", "not-processed"], {"finding": "not-processed"}),
    (["--status", "queued"], {"status": "queued"}),
    (["--flag", "outside-intended-use"], {"flag": "outside-intended-use"}),
    (["--min-probability", "0.5"], {"min_probability": "0.5"}),
    (["--model-version", "pneumonet-1.1.0"], {"model_version": "pneumonet-1.1.0"}),
    (["--sort", "probability"], {"sort": "probability"}),
    (["--sort", "triage", "--patient-id", "P001"], {"sort": "triage", "patient_id": "P001"}),
]


def _cli_uids(argv: list[str]) -> list[str]:
    parser = argparse.ArgumentParser()
    staff.add_results_arguments(parser)
    args = parser.parse_args([*argv, "--format", "json"])
    out = io.StringIO()
    with redirect_stdout(out):
        assert staff.cmd_results(args) == 0
    return [row["study_uid"] for row in json.loads(out.getvalue())]


@pytest.mark.parametrize(
    ("argv", "params"), FILTERS, ids=[" ".join(a) or "none" for a, _ in FILTERS]
)
def test_cli_and_api_give_the_same_rows(
    client: TestClient, staff_db: StaffDb, monkeypatch: pytest.MonkeyPatch,
    argv: list[str], params: dict[str, str],
) -> None:  # fmt: skip
    monkeypatch.setenv("PNEUMO_DATABASE_URL", staff_db.url)
    monkeypatch.setenv("PNEUMO_DATA_DIR", str(staff_db.data_dir))
    response = client.get("/api/studies", params=params, headers=bearer(staff_db.tokens["viewer"]))
    assert response.status_code == 200
    api = [row["study_uid"] for row in response.json()["studies"]]
    assert api == _cli_uids(argv)
    assert api or params.get("status") == "failed"


def test_cli_results_csv_and_table(staff_db: StaffDb, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PNEUMO_DATABASE_URL", staff_db.url)
    parser = argparse.ArgumentParser()
    staff.add_results_arguments(parser)
    for fmt in ("csv", "table"):
        out = io.StringIO()
        with redirect_stdout(out):
            assert (
                staff.cmd_results(
                    parser.parse_args(["--format", fmt, "--paths", "--accession", "ACC001"])
                )
                == 0
            )
        text = out.getvalue()
        assert "ACC001" in text and "sr_file" in text and "PNEUMONIA" in text
    assert staff.cmd_results(parser.parse_args(["--study-uid", "not a uid"])) == 2


def test_keyset_pages(client: TestClient, staff_db: StaffDb) -> None:
    headers = bearer(staff_db.tokens["viewer"])
    seen: list[str] = []
    params: dict[str, str] = {"limit": "2", "sort": "triage"}
    while True:
        body = client.get("/api/studies", params=params, headers=headers).json()
        seen += [r["study_uid"] for r in body["studies"]]
        if body["next_cursor"] is None:
            break
        params["cursor"] = body["next_cursor"]
    assert sorted(seen) == sorted(s.study_uid for s in staff_db.studies) and len(seen) == 6
    bad = client.get("/api/studies", params={"cursor": "junk"}, headers=headers)
    assert bad.status_code == 422


def test_study_detail(client: TestClient, staff_db: StaffDb) -> None:
    headers = bearer(staff_db.tokens["viewer"])
    lateral = client.get(f"/api/studies/{staff_db.studies[1].study_uid}", headers=headers).json()
    assert [(i["selection"], i["skip_reason"]) for i in lateral["instances"]] == [
        ("selected", None), ("skipped", "lateral-view")
    ]  # fmt: skip
    revised = client.get(f"/api/studies/{staff_db.studies[3].study_uid}", headers=headers).json()
    assert [(r["revision"], r["model"]["version"]) for r in revised["results"]] == [
        (2, "1.1.0"),
        (1, "1.0.0"),
    ]
    newest = revised["results"][0]
    assert newest["model"]["sha256"] == "b" * 64
    assert newest["timings"] == {"select": 0.01, "predict": 0.2}
    assert newest["sr_sop_instance_uid"] and newest["deliveries"][0]["status"] == "sent"
    assert newest["images"][0]["probability"] == 0.83
    assert client.get("/api/studies/1.2.3", headers=headers).status_code == 404
    assert client.get("/api/studies/not-a-uid", headers=headers).status_code == 422


def test_images_and_heatmaps(client: TestClient, staff_db: StaffDb) -> None:
    headers = bearer(staff_db.tokens["viewer"])
    first = staff_db.studies[0]
    base = f"/api/studies/{first.study_uid}/images/{first.sop_uids[0]}"
    image = client.get(f"{base}/image.png", headers=headers)
    heatmap = client.get(f"{base}/heatmap.png", headers=headers)
    assert image.headers["content-type"] == heatmap.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).mode == "L"
    assert Image.open(io.BytesIO(heatmap.content)).mode == "RGB"
    other = staff_db.studies[1]
    assert (
        client.get(
            f"/api/studies/{other.study_uid}/images/{first.sop_uids[0]}/image.png", headers=headers
        ).status_code
        == 404
    )
    assert (
        client.get(
            f"/api/studies/{other.study_uid}/images/{other.sop_uids[0]}/heatmap.png",
            headers=headers,
        ).status_code
        == 404
    )


def test_models(client: TestClient, staff_db: StaffDb) -> None:
    models = client.get("/api/models", headers=bearer(staff_db.tokens["viewer"])).json()
    assert [m["label"] for m in models] == ["pneumonet-1.1.0", "pneumonet-1.0.0"]
    assert [m["active"] for m in models] == [False, False]  # nothing activated yet
    from sqlalchemy import select

    from db.engine import session_scope
    from db.models import ModelVersion
    from db.models_registry import activate

    with session_scope(staff_db.url) as session:
        first = session.execute(select(ModelVersion).where(ModelVersion.version == "1.0.0"))
        activate(session, first.scalar_one().id, "/srv/weights/pneumonet-1.0.0.pt", "test")
    models = client.get("/api/models", headers=bearer(staff_db.tokens["viewer"])).json()
    assert [m["active"] for m in models] == [False, True]
    assert client.get("/openapi.json").json()["paths"]["/api/studies"]


def test_every_patient_data_read_is_audited(client: TestClient, staff_db: StaffDb) -> None:
    headers = bearer(staff_db.tokens["viewer"])
    first = staff_db.studies[0]
    base = f"/api/studies/{first.study_uid}"
    reads = [
        ("/api/studies?patient_id=P001", "list-studies", None),
        (base, "read-study", first.study_uid),
        (f"{base}/images/{first.sop_uids[0]}/image.png", "read-image", first.study_uid),
        (f"{base}/images/{first.sop_uids[0]}/heatmap.png", "read-heatmap", first.study_uid),
        ("/fhir/DiagnosticReport?subject=P001", "read-fhir", None),
    ]
    for path, action, study_uid in reads:
        with session_scope(staff_db.url) as s:
            before = len(access.audit_events(s))
        assert client.get(path, headers=headers).status_code == 200, path
        with session_scope(staff_db.url) as s:
            events = access.audit_events(s)
        assert len(events) == before + 1, path
        newest = events[0]
        assert (newest.user, newest.role, newest.action.value, newest.study_uid, newest.client) == (
            "viewer-user", access.Role.VIEWER, action, study_uid, "testclient",
        ), path  # fmt: skip
