"""The reconciler and the attempt bookkeeping, on a real SQLite database with a fake broker.

Each case puts the database in a state a fault leaves behind (a lost message,
a dead worker, a task lost by a live worker, a failed delivery) and checks
that one reconciler pass re-publishes exactly what is stale, once, and
dead-letters with a reason when the attempts are used up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from db import migrate
from db import repository as repo
from db.engine import session_scope
from db.models import (
    Delivery,
    DeliveryStatus,
    Job,
    JobKind,
    JobStatus,
    Study,
    StudyStatus,
    WorkerHeartbeat,
)
from worker.config import WorkerConfig
from worker.heartbeat import Heartbeat
from worker.queues import QueueName
from worker.reconciler import Publisher, reconcile_once
from worker.tasks import LOST_ATTEMPT_ERROR, _begin

UID = "1.2.826.0.1.3680043.8.498.4242"


@dataclass
class FakePublisher(Publisher):
    empty: bool = True
    processed: list[tuple[int, int, QueueName]] = field(default_factory=list)
    delivered: list[tuple[int, str]] = field(default_factory=list)

    def process(self, study_id: int, revision: int, queue: QueueName) -> None:
        self.processed.append((study_id, revision, queue))

    def deliver(self, result_id: int, destination: str) -> None:
        self.delivered.append((result_id, destination))

    def queues_empty(self) -> bool:
        return self.empty


@pytest.fixture
def config(tmp_path: Path) -> WorkerConfig:
    url = f"sqlite:///{tmp_path / 'pneumo.db'}"
    migrate.upgrade(url)
    return WorkerConfig(
        database_url=url,
        broker_url="redis://unused",
        data_dir=tmp_path,
        results_dir=tmp_path / "results",
        task_max_retries=2,
    )


def queued_study(config: WorkerConfig, uid: str = UID) -> tuple[int, int]:
    with session_scope(config.database_url) as session:
        return repo.mark_study_queued(session, uid, amended=False)


def age(config: WorkerConfig, study_id: int, seconds: float) -> None:
    """Move the study's queue time into the past."""
    with session_scope(config.database_url) as session:
        session.execute(
            update(Study)
            .where(Study.id == study_id)
            .values(queued_at=datetime.now(UTC) - timedelta(seconds=seconds))
        )


def start(config: WorkerConfig, study_id: int, revision: int, task: str, worker: str) -> object:
    context = {"task_id": task, "queue": "realtime", "worker_host": worker, "attempt": 0}
    return _begin(config, study_id, revision, context)


def beat(config: WorkerConfig, worker: str, active: list[str]) -> None:
    Heartbeat(config, worker, active=lambda: active).beat()


def status(config: WorkerConfig, study_id: int) -> tuple[StudyStatus, str | None]:
    with session_scope(config.database_url) as session:
        study = session.get(Study, study_id)
        assert study is not None
        return study.status, study.last_error


def later(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def test_queued_study_without_message_is_republished_once(config: WorkerConfig) -> None:
    study_id, revision = queued_study(config)
    publisher = FakePublisher()
    assert not reconcile_once(config, publisher)  # fresh: its message may still be on the way
    age(config, study_id, 120)
    assert reconcile_once(config, FakePublisher(empty=False)).republished == []  # queue busy
    assert reconcile_once(config, publisher).republished == [study_id]
    assert publisher.processed == [(study_id, revision, QueueName.REALTIME)]
    assert reconcile_once(config, publisher).republished == []  # not again so soon
    assert reconcile_once(config, publisher, now=later(61)).republished == [study_id]


def test_processing_on_a_dead_worker_is_republished(config: WorkerConfig) -> None:
    study_id, revision = queued_study(config)
    beat(config, "w1@host", ["task-1"])
    assert start(config, study_id, revision, "task-1", "w1@host") is not None
    publisher = FakePublisher()
    assert not reconcile_once(config, publisher)  # its worker beats with the task
    # 31 s later the worker has not beaten again: presumed dead.
    assert reconcile_once(config, publisher, now=later(31)).republished == [study_id]
    # The new wake-up (another task id) closes the lost attempt and counts it.
    with session_scope(config.database_url) as session:
        session.execute(
            update(WorkerHeartbeat).values(beat_at=datetime.now(UTC) - timedelta(seconds=31))
        )
    beat(config, "w2@host", [])
    attempt = start(config, study_id, revision, "task-2", "w2@host")
    assert getattr(attempt, "number", None) == 1
    with session_scope(config.database_url) as session:
        jobs = session.execute(select(Job).order_by(Job.id)).scalars().all()
        assert [(j.status, j.error) for j in jobs] == [
            (JobStatus.RETRYING, LOST_ATTEMPT_ERROR),
            (JobStatus.RUNNING, None),
        ]


def test_task_lost_by_a_live_worker_is_republished(config: WorkerConfig) -> None:
    """A worker that beats without the task (cancelled on a broker reconnect) lost it."""
    study_id, revision = queued_study(config)
    start(config, study_id, revision, "task-1", "w1@host")
    with session_scope(config.database_url) as session:
        session.execute(update(Job).values(started_at=datetime.now(UTC) - timedelta(seconds=20)))
    beat(config, "w1@host", ["another-task"])
    assert reconcile_once(config, FakePublisher()).republished == [study_id]


def test_duplicate_wake_up_leaves_a_live_attempt_alone(config: WorkerConfig) -> None:
    study_id, revision = queued_study(config)
    beat(config, "w1@host", ["task-1"])
    start(config, study_id, revision, "task-1", "w1@host")
    assert start(config, study_id, revision, "task-2", "w2@host") == "running-elsewhere"
    with session_scope(config.database_url) as session:
        repo.set_study_status(session, study_id, StudyStatus.DONE)
    assert start(config, study_id, revision, "task-3", "w2@host") == "already-done"


def test_redelivered_message_counts_lost_attempts_then_dead_letters(config: WorkerConfig) -> None:
    """A pool child killed on every attempt: the same message comes back; N attempts, then stop."""
    study_id, revision = queued_study(config)
    beat(config, "w1@host", ["task-1"])
    numbers = [getattr(start(config, study_id, revision, "task-1", "w1@host"), "number", None)]
    numbers += [getattr(start(config, study_id, revision, "task-1", "w1@host"), "number", None)]
    numbers += [getattr(start(config, study_id, revision, "task-1", "w1@host"), "number", None)]
    assert numbers == [0, 1, 2]
    assert start(config, study_id, revision, "task-1", "w1@host") == "dead-letter"
    state, error = status(config, study_id)
    assert state is StudyStatus.DEAD_LETTER
    assert error is not None and "3 attempt(s)" in error and "WorkerLost" in error


def test_stale_processing_with_attempts_used_up_is_dead_lettered(config: WorkerConfig) -> None:
    study_id, revision = queued_study(config)
    for task in ("t1", "t2", "t3"):
        start(config, study_id, revision, task, "gone@host")  # no heartbeat: all lost
    publisher = FakePublisher()
    report = reconcile_once(config, publisher, now=later(31))
    assert report.dead_lettered == [study_id] and publisher.processed == []
    state, error = status(config, study_id)
    assert state is StudyStatus.DEAD_LETTER and error and "3 attempt(s)" in error


def test_failed_delivery_is_republished_until_its_attempts_are_used_up(
    config: WorkerConfig,
) -> None:
    study_id, revision = queued_study(config)
    with session_scope(config.database_url) as session:
        mv = repo.ensure_model_version(
            session, name="m", version="1", sha256="0" * 64, threshold=0.5
        )
        result_id = repo.save_result(
            session,
            repo.ResultRecord(study_id, mv, revision, "complete", 0.1, False, 0.5, False, False),  # type: ignore[arg-type]
            [],
        )
        delivery_id = repo.ensure_delivery(session, result_id, "PACS@127.0.0.1:104")
        repo.record_delivery_attempt(session, delivery_id, ok=False, error="refused")
        repo.set_study_status(session, study_id, StudyStatus.DONE)
    publisher = FakePublisher()
    assert reconcile_once(config, publisher).deliveries == []  # just failed: its retry may run
    assert reconcile_once(config, publisher, now=later(61)).deliveries == [delivery_id]
    assert publisher.delivered == [(result_id, "PACS@127.0.0.1:104")]
    with session_scope(config.database_url) as session:
        session.execute(update(Delivery).values(attempts=config.delivery_max_attempts))
    assert reconcile_once(config, publisher, now=later(200)).deliveries == []
    with session_scope(config.database_url) as session:
        assert session.execute(select(Delivery.status)).scalar_one() is DeliveryStatus.FAILED
        assert session.execute(select(Job.kind)).scalars().all() == []
    assert JobKind.DELIVER  # deliveries are counted on their row, not as study attempts


def test_overdue_retry_is_republished(config: WorkerConfig) -> None:
    """A failed attempt whose delayed retry died with its worker is woken up again."""
    study_id, revision = queued_study(config)
    start(config, study_id, revision, "task-1", "w1@host")
    with session_scope(config.database_url) as session:
        session.execute(
            update(Job).values(status=JobStatus.RETRYING, ended_at=datetime.now(UTC), error="X: y")
        )
        repo.set_study_status(session, study_id, StudyStatus.FAILED, error="X: y")
    publisher = FakePublisher()
    assert reconcile_once(config, publisher, now=later(60)).republished == []  # retry may be due
    assert reconcile_once(config, publisher, now=later(400)).republished == [study_id]


def test_heartbeats_of_long_gone_workers_are_pruned(config: WorkerConfig) -> None:
    beat(config, "gone@host", [])
    reconcile_once(config, FakePublisher(), now=later(2 * 86400))
    with session_scope(config.database_url) as session:
        assert repo.heartbeats(session, ["gone@host"]) == {}
