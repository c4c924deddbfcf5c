"""The reconciler: the database says what work is unfinished; re-publish what has no live message.

The database is the source of truth for work (study ``queued`` →
``processing`` → ``done`` / ``failed`` → ... → ``dead-letter``, and each
delivery); the broker only carries wake-ups, and a wake-up can be lost (a
Redis without persistence restarted, a ``FLUSHALL``, a worker host that died
holding an unacknowledged message, a task cancelled on a connection loss).
:func:`reconcile_once` finds studies and deliveries whose state is stale and
publishes a new wake-up for each:

* ``queued``, queued longer than ``reconcile_stale_seconds`` ago and not
  re-published since, while the queues are empty (so no message waits for it);
* ``processing``, where no attempt is alive by its worker's heartbeat
  (:func:`worker.heartbeat.job_alive`): the worker died or lost the task;
* ``failed`` (a retry is due), when the retry did not start within its backoff
  plus ``reconcile_stale_seconds`` (the worker holding the delayed retry died);
* deliveries ``pending`` or ``failed`` untouched for ``reconcile_stale_seconds``
  with fewer than ``delivery_max_attempts`` attempts.

Re-publishing is harmless: tasks check the study's revision and state and
skip work that is done or alive elsewhere, and every write is an upsert.
Each re-publish is a compare-and-set on the row (``study.republished_at``,
``delivery.updated_at``), so several reconcilers publish a stale study once.
Attempts are bounded where they are counted, in the database: a stale study
whose attempts are used up is dead-lettered here with the reason.

Where it runs: a thread in every Celery worker's main process (started with
the heartbeat on ``worker_ready``, :mod:`worker.app`), every
``reconcile_interval_seconds``. Wherever a worker runs, stale work is found;
``pneumo up`` runs a worker, so the embedded stack has one too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from celery import Celery
from sqlalchemy.orm import Session

from db import repository as repo
from db.engine import session_scope
from db.models import StudyStatus
from worker.app import queue_depths
from worker.batches import pump_once
from worker.config import WorkerConfig
from worker.heartbeat import aware, job_alive
from worker.queues import QueueName
from worker.tasks import (
    DELIVER_RESULT,
    LOST_ATTEMPT_ERROR,
    MAX_BACKOFF_SECONDS,
    PROCESS_STUDY,
    attempts_exhausted_reason,
)

__all__ = [
    "HEARTBEAT_RETENTION",
    "CeleryPublisher",
    "Publisher",
    "ReconcileReport",
    "Reconciler",
    "reconcile_once",
]

log = logging.getLogger(__name__)

HEARTBEAT_RETENTION = timedelta(days=1)
"""Heartbeat rows of workers silent this long are deleted (each restart adds a node name)."""


class Publisher:
    """How the reconciler sends wake-ups (:class:`CeleryPublisher`; a fake in tests)."""

    def process(self, study_id: int, revision: int, queue: QueueName) -> None:
        """Publish ``process_study(study_id, revision)`` on ``queue``."""
        raise NotImplementedError

    def deliver(self, result_id: int, destination: str) -> None:
        """Publish ``deliver_result(result_id, destination)``."""
        raise NotImplementedError

    def queues_empty(self) -> bool:
        """True when no process_study message waits in any queue.

        Raises:
            Exception: when the broker cannot be reached (the caller skips the queued check).
        """
        raise NotImplementedError


class CeleryPublisher(Publisher):
    """Wake-ups through a Celery app's broker."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def process(self, study_id: int, revision: int, queue: QueueName) -> None:
        """Publish ``process_study``.

        Raises:
            kombu.exceptions.OperationalError: when the broker cannot be reached.
        """
        self.app.send_task(PROCESS_STUDY, args=[study_id, revision], queue=queue.value)

    def deliver(self, result_id: int, destination: str) -> None:
        """Publish ``deliver_result`` on the realtime queue.

        Raises:
            kombu.exceptions.OperationalError: when the broker cannot be reached.
        """
        self.app.send_task(
            DELIVER_RESULT, args=[result_id, destination], queue=QueueName.REALTIME.value
        )

    def queues_empty(self) -> bool:
        """True when every queue of :data:`worker.queues.QUEUE_PRIORITY` is empty.

        Raises:
            kombu.exceptions.OperationalError: when the broker cannot be reached.
        """
        depths = queue_depths(self.app)
        return all(depth == 0 for depth in depths.values())


@dataclass
class ReconcileReport:
    """What one :func:`reconcile_once` pass did (study and delivery ids)."""

    republished: list[int] = field(default_factory=list)
    dead_lettered: list[int] = field(default_factory=list)
    deliveries: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.republished or self.dead_lettered or self.deliveries)


def _queue_of(item: repo.WorkItem) -> QueueName:
    try:
        return QueueName(item.last_job_queue or QueueName.REALTIME.value)
    except ValueError:
        return QueueName.REALTIME


def _processing_lost(
    session: Session, config: WorkerConfig, item: repo.WorkItem, now: datetime
) -> bool:
    """True when no attempt of a ``processing`` study is alive (by heartbeats and time limit)."""
    jobs = repo.running_jobs(session, item.study_id, item.revision)
    beats = repo.heartbeats(session, [j.worker for j in jobs if j.worker])
    limit = timedelta(seconds=config.task_time_limit_seconds + config.heartbeat_stale_seconds)
    for job in jobs:
        if aware(job.started_at) < now - limit:
            continue  # past the hard time limit: Celery killed it, whatever the beat says
        beat = beats.get(job.worker or "")
        if job_alive(job, beat, now=now, stale_seconds=config.heartbeat_stale_seconds):
            return False
    # No running job: the status was set but the job closed (or never written); stale too,
    # once the grace has passed.
    return bool(jobs) or _older_than(item.queued_at, now, config.heartbeat_stale_seconds)


def _older_than(moment: datetime | None, now: datetime, seconds: float) -> bool:
    return moment is None or aware(moment) < now - timedelta(seconds=seconds)


def _retry_overdue(config: WorkerConfig, item: repo.WorkItem, now: datetime) -> bool:
    # The longest backoff a retry can wait, plus the staleness margin.
    wait = MAX_BACKOFF_SECONDS + config.reconcile_stale_seconds
    return item.last_job_ended_at is not None and _older_than(item.last_job_ended_at, now, wait)


def _is_stale(
    session: Session, config: WorkerConfig, item: repo.WorkItem, now: datetime, queues_empty: bool
) -> bool:
    if item.status is StudyStatus.QUEUED:
        return queues_empty and _older_than(item.queued_at, now, config.reconcile_stale_seconds)
    if item.status is StudyStatus.PROCESSING:
        return _processing_lost(session, config, item, now)
    return _retry_overdue(config, item, now)  # FAILED


def _reconcile_study(
    config: WorkerConfig,
    publisher: Publisher,
    item: repo.WorkItem,
    now: datetime,
    queues_empty: bool,
) -> str | None:
    """Re-publish or dead-letter one study when it is stale; what was done, or None."""
    quiet = (
        config.reconcile_stale_seconds
        if item.status is StudyStatus.QUEUED
        else config.heartbeat_stale_seconds
    )
    before = now - timedelta(seconds=quiet)  # not re-published since
    with session_scope(config.database_url) as session:
        if not _is_stale(session, config, item, now, queues_empty):
            return None
        attempts = repo.count_attempts(session, item.study_id, item.revision, since=item.queued_at)
        if item.status is not StudyStatus.QUEUED and attempts > config.task_max_retries:
            lost = [j.job_id for j in repo.running_jobs(session, item.study_id, item.revision)]
            repo.close_lost_jobs(session, lost, LOST_ATTEMPT_ERROR)
            reason = attempts_exhausted_reason(
                attempts, repo.last_job_error(session, item.study_id, item.revision)
            )
            repo.set_study_status(
                session,
                item.study_id,
                StudyStatus.DEAD_LETTER,
                error=reason,
                revision=item.revision,
            )
            return "dead-letter"
        if not repo.claim_republish(session, item.study_id, item.revision, before=before):
            return None  # re-published recently (by us or another reconciler)
    publisher.process(item.study_id, item.revision, _queue_of(item))
    return "republished"


def _reconcile_deliveries(config: WorkerConfig, publisher: Publisher, now: datetime) -> list[int]:
    before = now - timedelta(seconds=config.reconcile_stale_seconds)
    done: list[int] = []
    with session_scope(config.database_url) as session:
        stale = repo.stale_deliveries(
            session, before=before, max_attempts=config.delivery_max_attempts
        )
    for delivery in stale:
        with session_scope(config.database_url) as session:
            if not repo.claim_delivery(session, delivery.delivery_id, before=before):
                continue
        publisher.deliver(delivery.result_id, delivery.destination)
        done.append(delivery.delivery_id)
    return done


def reconcile_once(
    config: WorkerConfig, publisher: Publisher, *, now: datetime | None = None
) -> ReconcileReport:
    """One pass over unfinished studies and unsent deliveries (see the module docstring).

    Raises:
        sqlalchemy.exc.SQLAlchemyError: when the database fails.
        kombu.exceptions.OperationalError: when a wake-up cannot be published.
    """
    now = now or datetime.now(UTC)
    report = ReconcileReport()
    statuses: Sequence[StudyStatus] = (
        StudyStatus.QUEUED,
        StudyStatus.PROCESSING,
        StudyStatus.FAILED,
    )
    with session_scope(config.database_url) as session:
        items = repo.unfinished_studies(session, statuses)
    queues_empty = False
    if any(i.status is StudyStatus.QUEUED for i in items):
        try:
            queues_empty = publisher.queues_empty()
        except Exception as exc:  # broker down: publishing would fail anyway
            log.warning("reconciler: queue depth unknown (%s)", type(exc).__name__)
    for item in items:
        action = _reconcile_study(config, publisher, item, now, queues_empty)
        if action == "republished":
            report.republished.append(item.study_id)
        elif action == "dead-letter":
            report.dead_lettered.append(item.study_id)
    report.deliveries = _reconcile_deliveries(config, publisher, now)
    # Reprocessing batches: the next items, at each batch's rate (worker.batches).
    pump_once(config, lambda study_id, rev: publisher.process(study_id, rev, QueueName.BATCH))
    with session_scope(config.database_url) as session:
        repo.prune_heartbeats(session, before=now - HEARTBEAT_RETENTION)
    if report:
        log.info(
            "reconciler: %d study(ies) re-published, %d dead-lettered, %d delivery(ies) re-published",
            len(report.republished),
            len(report.dead_lettered),
            len(report.deliveries),
        )
    return report


class Reconciler(threading.Thread):
    """A daemon thread running :func:`reconcile_once` every ``reconcile_interval_seconds``.

    A failing pass (database or broker down) is logged and tried again next time.
    """

    def __init__(
        self,
        config: WorkerConfig,
        publisher: Publisher,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        super().__init__(name="pneumo-reconciler", daemon=True)
        self.config = config
        self.publisher = publisher
        self._clock = clock
        self._stop_event = threading.Event()

    def run(self) -> None:
        interval = self.config.reconcile_interval_seconds
        while not self._stop_event.wait(interval):
            try:
                reconcile_once(self.config, self.publisher, now=self._clock())
            except Exception as exc:
                log.warning("reconciler pass failed: %s", type(exc).__name__)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the current pass."""
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout)
