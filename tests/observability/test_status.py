"""``pneumo status`` summarises what ``/metrics`` shows: workers, queues, studies, deliveries."""

from __future__ import annotations

import json

import pytest

from pneumo.cli import main
from tests.observability.conftest import ACCESSION, PACS_A, PACS_B, PATIENT_ID, SeededDb

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


@pytest.fixture
def status_env(seeded_db: SeededDb, broker_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PNEUMO_DATABASE_URL", seeded_db.url)
    monkeypatch.setenv("PNEUMO_BROKER_URL", broker_url)
    monkeypatch.setenv("PNEUMO_DATA_DIR", str(seeded_db.data_dir))


def test_status_json_summarises_workers_queues_studies_and_deliveries(
    status_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["workers"]["live"] == 2 and out["workers"]["stale"] == 1
    assert out["workers"]["running_tasks"] == 2
    assert out["workers"]["names"] == ["pneumo-1@gpu-a", "pneumo-2@gpu-b"]
    assert out["queues"] == {"realtime": 0, "batch": 0}
    assert out["studies"] == {"done": 3, "queued": 2, "dead-letter": 1}
    assert out["deliveries"][PACS_A] == {"pending": 0, "sent": 2, "failed": 1, "failed_attempts": 4}
    assert out["deliveries"][PACS_B]["pending"] == 1


def test_status_table_names_no_patient(
    status_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status"]) == 0
    text = capsys.readouterr().out
    assert "workers: live=2 stale=1 running=2" in text
    assert f"{PACS_A}  pending=0  sent=2  failed=1  failed_attempts=4" in text
    assert PATIENT_ID not in text and ACCESSION not in text
