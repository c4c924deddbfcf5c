"""``/metrics`` scraped over HTTP from a real API server, after seeding the database
and the broker: values, not only names."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from tests.observability.conftest import (
    ACCESSION,
    PACS_A,
    PACS_B,
    PATIENT_ID,
    SeededDb,
    parse,
    value,
)

pytestmark = [pytest.mark.postgres]


def _queue_two_batch_messages(broker_url: str, db: SeededDb) -> None:
    from pneumo.celery_app import build_app
    from pneumo.settings import load_settings

    app = build_app(load_settings(database_url=db.url, broker_url=broker_url, data_dir=db.data_dir))
    for _ in range(2):  # a task name no worker consumes: the messages stay queued
        app.send_task("tests.observability.never_run", queue="batch")


def test_scrape_reports_database_and_broker_state(
    seeded_db: SeededDb, broker_url: str, api_for: Callable[..., str]
) -> None:
    _queue_two_batch_messages(broker_url, seeded_db)
    base = api_for(database_url=seeded_db.url, broker_url=broker_url, data_dir=seeded_db.data_dir)

    response = httpx.get(f"{base}/metrics", timeout=30)  # no token: scrapers carry none
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    m = parse(response.text)

    assert value(m, "pneumo_database_up") == 1
    assert value(m, "pneumo_broker_up") == 1
    assert value(m, "pneumo_queue_depth", queue="batch") == 2
    assert value(m, "pneumo_queue_depth", queue="realtime") == 0

    assert value(m, "pneumo_studies", status="done") == 3
    assert value(m, "pneumo_studies", status="queued") == 2
    assert value(m, "pneumo_studies", status="dead-letter") == 1
    assert value(m, "pneumo_studies", status="processing") == 0

    assert value(m, "pneumo_deliveries", destination=PACS_A, status="sent") == 2
    assert value(m, "pneumo_deliveries", destination=PACS_A, status="failed") == 1
    assert value(m, "pneumo_deliveries", destination=PACS_B, status="pending") == 1
    # PACS_A: one failed try before a success, three on the still-failing row.
    assert value(m, "pneumo_send_failures_total", destination=PACS_A) == 4
    assert value(m, "pneumo_send_failures_total", destination=PACS_B) == 0

    # Only the last hour's results: the 99 s inference of two hours ago is not counted.
    assert value(m, "pneumo_stage_seconds_count", stage="inference") == 3
    assert value(m, "pneumo_stage_seconds_sum", stage="inference") == pytest.approx(0.6)
    assert value(m, "pneumo_stage_seconds", stage="inference", quantile="0.5") == pytest.approx(0.2)
    assert value(m, "pneumo_stage_seconds", stage="inference", quantile="0.99") == pytest.approx(
        0.3
    )
    assert value(m, "pneumo_stage_seconds_count", stage="load") == 3
    assert value(m, "pneumo_send_seconds_count", destination=PACS_A) == 3
    assert value(m, "pneumo_study_processing_seconds_count") == 3
    # Queued 5 min ago, results 3, 2 and 1 min ago: 120 to 242 s.
    assert value(m, "pneumo_study_processing_seconds", quantile="0.5") == pytest.approx(181, abs=2)

    new, old = "ab" * 32, "cd" * 32
    info = dict(name="pneumonet", version="1.0.0", sha256=new, active="1")
    assert value(m, "pneumo_model_info", **info) == 1
    info = dict(name="pneumonet", version="0.9.0", sha256=old, active="0")
    assert value(m, "pneumo_model_info", **info) == 1
    assert value(m, "pneumo_model_results_total", name="pneumonet", version="1.0.0") == 3
    assert value(m, "pneumo_model_results_total", name="pneumonet", version="0.9.0") == 1

    assert value(m, "pneumo_workers", state="live") == 2
    assert value(m, "pneumo_workers", state="stale") == 1
    assert value(m, "pneumo_worker_running_tasks") == 2

    # No listener runs in this process: its counters are absent, not zero.
    assert not any(name.startswith("pneumo_instances_") for name, _ in m)
    assert all(name.startswith("pneumo_") for name, _ in m)


def test_metrics_need_no_token_and_carry_no_patient_data(
    seeded_db: SeededDb, broker_url: str, api_for: Callable[..., str]
) -> None:
    base = api_for(database_url=seeded_db.url, broker_url=broker_url, data_dir=seeded_db.data_dir)
    body = httpx.get(f"{base}/metrics", timeout=30).text
    assert "pneumo_studies" in body
    for phi in (PATIENT_ID, ACCESSION):
        assert phi not in body
    # Nor a UID: the seeded study UIDs never become labels.
    assert "1.2.826.0.1.3680043.8.498" not in body
    # The staff API beside it still wants a token.
    assert httpx.get(f"{base}/api/studies", timeout=30).status_code == 401


def test_scrape_answers_quickly_when_the_broker_is_down(
    seeded_db: SeededDb, api_for: Callable[..., str]
) -> None:
    from tests.conftest import free_port

    down = f"redis://127.0.0.1:{free_port()}/0"
    base = api_for(database_url=seeded_db.url, broker_url=down, data_dir=seeded_db.data_dir)
    started = time.monotonic()
    m = parse(httpx.get(f"{base}/metrics", timeout=30).text)
    assert time.monotonic() - started < 10
    assert value(m, "pneumo_broker_up") == 0
    assert value(m, "pneumo_database_up") == 1
    assert value(m, "pneumo_studies", status="done") == 3
    assert not any(name == "pneumo_queue_depth" for name, _ in m)
