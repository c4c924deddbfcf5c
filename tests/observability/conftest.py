"""Fixtures of the observability tests: a seeded PostgreSQL database, a real API server,
a scrape parser."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom.uid
import pytest
from prometheus_client.parser import text_string_to_metric_families

from db.engine import session_scope
from db.migrate import upgrade
from db.models import (
    Delivery,
    DeliveryStatus,
    ModelVersion,
    Result,
    ResultStatus,
    Study,
    StudyStatus,
    WorkerHeartbeat,
    utcnow,
)
from dicom_io.config import ListenerConfig
from dicom_io.listener import Listener
from tests.conftest import port_open, serve_app
from tests.db.postgres import throwaway_database
from tests.dicom_receive.dicom_receive_helpers import make_instance, scu_store

# The end-to-end fixtures (processes stopped at teardown, a DCMTK storescp PACS)
# for the `pneumo up` flow whose JSON logs and /metrics are checked.
from tests.e2e.conftest import pacs, procs  # noqa: F401

PATIENT_ID = "QKB7731946"
ACCESSION = "QKA4471"
PACS_A = "PACS@10.0.0.5:104"
PACS_B = "ARCHIVE@10.0.0.6:11112"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text scrape, keyed by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[(metric, frozenset(labels.items()))]


@dataclass(frozen=True)
class SeededDb:
    url: str
    data_dir: Path


def _seed(url: str) -> None:
    now = utcnow()
    with session_scope(url) as s:
        model = ModelVersion(name="pneumonet", version="1.0.0", sha256="ab" * 32, threshold=0.5)
        old_model = ModelVersion(name="pneumonet", version="0.9.0", sha256="cd" * 32, threshold=0.5)
        s.add_all([model, old_model])
        s.flush()
        statuses = [StudyStatus.DONE] * 3 + [StudyStatus.QUEUED] * 2 + [StudyStatus.DEAD_LETTER]
        studies = []
        for i, status in enumerate(statuses):
            study = Study(
                study_uid=f"1.2.826.0.1.3680043.8.498.{i + 1}",
                patient_id=PATIENT_ID,
                accession_number=ACCESSION,
                status=status,
                revision=1,
                queued_at=now - timedelta(minutes=5, seconds=i),
                completed_at=now if status is StudyStatus.DONE else None,
            )
            studies.append(study)
        s.add_all(studies)
        s.flush()
        # Three recent results (inference 0.1, 0.2, 0.3 s) and one two hours old (ignored).
        results = []
        for i, study in enumerate(studies[:3]):
            results.append(
                Result(
                    study_id=study.id,
                    model_version_id=model.id,
                    revision=1,
                    status=ResultStatus.COMPLETE,
                    probability=0.9,
                    finding=True,
                    threshold=0.5,
                    timings={"load": 0.01, "inference": 0.1 * (i + 1), f"send:{PACS_A}": 0.05},
                    created_at=now - timedelta(minutes=3 - i),
                    updated_at=now,
                )  # fmt: skip
            )
        results.append(
            Result(
                study_id=studies[5].id,
                model_version_id=old_model.id,
                revision=1,
                status=ResultStatus.COMPLETE,
                probability=0.1,
                finding=False,
                threshold=0.5,
                timings={"inference": 99.0},
                created_at=now - timedelta(hours=2),
                updated_at=now - timedelta(hours=2),
            )  # fmt: skip
        )
        s.add_all(results)
        s.flush()
        s.add_all(
            [
                # PACS_A: sent twice (one after a failed attempt), one still failing (3 tries).
                Delivery(result_id=results[0].id, destination=PACS_A,
                         status=DeliveryStatus.SENT, attempts=2),
                Delivery(result_id=results[1].id, destination=PACS_A,
                         status=DeliveryStatus.SENT, attempts=1),
                Delivery(result_id=results[2].id, destination=PACS_A,
                         status=DeliveryStatus.FAILED, attempts=3, last_error="refused"),
                # PACS_B: one pending, never tried.
                Delivery(result_id=results[0].id, destination=PACS_B,
                         status=DeliveryStatus.PENDING, attempts=0),
            ]
        )  # fmt: skip
        s.add_all(
            [
                WorkerHeartbeat(worker="pneumo-1@gpu-a", hostname="gpu-a", pid=11,
                                beat_at=now, active_tasks=["t1", "t2"]),
                WorkerHeartbeat(worker="pneumo-2@gpu-b", hostname="gpu-b", pid=12,
                                beat_at=now, active_tasks=[]),
                WorkerHeartbeat(worker="pneumo-3@gpu-c", hostname="gpu-c", pid=13,
                                beat_at=now - timedelta(minutes=5), active_tasks=["t3"]),
            ]
        )  # fmt: skip


@pytest.fixture
def seeded_db(postgres_url: str, tmp_path: Path) -> Iterator[SeededDb]:
    with throwaway_database(postgres_url) as url:
        upgrade(url)
        _seed(url)
        yield SeededDb(url, tmp_path / "data")


REDIS_DB_URL = "redis://127.0.0.1:6379/13"


@pytest.fixture
def broker_url() -> Iterator[str]:
    """Database 13 of the shared Redis, flushed before and after (skip when none runs)."""
    if not port_open("127.0.0.1", 6379):
        pytest.skip("Redis not reachable at 127.0.0.1:6379")
    import redis

    client = redis.Redis.from_url(REDIS_DB_URL, socket_connect_timeout=1)
    client.flushdb()
    yield REDIS_DB_URL
    client.flushdb()


@pytest.fixture
def api_for() -> Iterator[Callable[..., str]]:
    """Start the staff API over the given settings overrides; returns its base URL."""
    running: list[Iterator[str]] = []

    def start(**overrides: Any) -> str:
        from pneumo.api.app import create_app
        from pneumo.settings import load_settings

        server = serve_app(create_app(load_settings(**overrides)))
        running.append(server)
        return next(server)

    yield start
    for server in running:
        next(server, None)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    """A real listener that has answered 2 stored, 1 duplicate and 1 refused C-STORE."""
    config = ListenerConfig(
        spool_dir=tmp_path / "spool", host="127.0.0.1", port=0, study_quiet_seconds=0.4,
        study_release_grace_seconds=0.2, spool_reserve_bytes=0,
    )  # fmt: skip
    listener = Listener(config, lambda _ready: None)
    listener.start()
    try:
        study = pydicom.uid.generate_uid()
        first, second = make_instance(study), make_instance(study)
        bad = make_instance("1.2.3.abc")  # not a UID: refused (0xA900)
        assert scu_store(listener.port, [first, second, bad, first]) == [0, 0, 0xA900, 0]
        yield listener
    finally:
        listener.stop()
