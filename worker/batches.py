"""Batch orchestration: start a reprocessing batch, publish its items (throttled), follow it.

The database holds the batch (:mod:`db.batches`); this module moves it along.
:func:`pump_once` allocates the next revisions of every active batch (one
transaction, at most each batch's ``max_rate`` allows) and *then* publishes
``process_study(study_id, revision)`` on :attr:`QueueName.BATCH` for each, so a
crash between the two leaves a ``queued`` study the reconciler re-publishes,
never a second revision. It runs in the command that started the batch (while
``--wait`` follows it) and in every worker's reconciler pass, so a batch whose
command returned (no ``--wait``) is still published, at its rate.

Outcomes are recorded by the task itself (:func:`db.batches.finish_item` in
:mod:`worker.tasks`, in the transaction that records the study's outcome).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from celery import Celery

from db import batches as store
from db.engine import session_scope
from worker.config import WorkerConfig
from worker.queues import QueueName
from worker.tasks import PROCESS_STUDY

__all__ = [
    "BatchStart",
    "Publish",
    "cancel",
    "celery_publish",
    "follow",
    "pump_once",
    "retry",
    "start_batch",
    "view",
]

log = logging.getLogger(__name__)

Publish = Callable[[int, int], None]
"""Publishes ``process_study(study_id, revision)`` on the batch queue."""


def celery_publish(app: Celery) -> Publish:
    """A :data:`Publish` through ``app``'s broker (raises kombu's OperationalError when down)."""

    def publish(study_id: int, revision: int) -> None:
        app.send_task(PROCESS_STUDY, args=[study_id, revision], queue=QueueName.BATCH.value)

    return publish


@dataclass(frozen=True)
class BatchStart:
    """A batch just recorded: its id, how many studies, and those left out (pixels purged)."""

    batch_id: int
    studies: int
    purged: tuple[str, ...]


def start_batch(
    database_url: str,
    selector: store.Selector,
    *,
    started_by: str,
    max_rate: float | None = None,
    include_purged: bool = False,
) -> BatchStart:
    """Select the studies and record the batch with one queued item each (nothing published:
    :func:`pump_once` does, here or in the workers' reconcilers).

    ``include_purged`` keeps studies whose pixels retention deleted (set it when a
    PACS is configured to retrieve them from); otherwise they are left out.

    Raises:
        ValueError: an empty selector, or ``max_rate`` not positive.
        sqlalchemy.exc.SQLAlchemyError: when the database fails.
    """
    with session_scope(database_url) as session:
        selection = store.select_studies(session, selector, include_purged=include_purged)
        batch_id = store.create_batch(
            session,
            started_by=started_by,
            selector=selector.as_dict(),
            study_ids=selection.study_ids,
            max_rate=max_rate,
        )
    log.info("batch %d: %d study(ies) selected by %s", batch_id, len(selection.study_ids),
             started_by)  # fmt: skip
    return BatchStart(batch_id, len(selection.study_ids), selection.purged)


def pump_once(
    config: WorkerConfig,
    publish: Publish,
    *,
    batch_ids: list[int] | None = None,
    now: datetime | None = None,
) -> int:
    """Allocate and publish the next items of the active batches (or of ``batch_ids``); how many.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: when the database fails.
        kombu.exceptions.OperationalError: when the broker cannot take a wake-up (the
            allocated studies stay ``queued``: the reconciler re-publishes them).
    """
    if batch_ids is None:
        with session_scope(config.database_url) as session:
            batch_ids = store.active_batch_ids(session)
    published = 0
    for batch_id in batch_ids:
        with session_scope(config.database_url) as session:
            allocations = store.allocate_items(session, batch_id, now=now)
        for allocation in allocations:  # committed first: a revision is never allocated twice
            publish(allocation.study_id, allocation.revision)
            published += 1
    return published


def view(config: WorkerConfig, batch_id: int) -> store.BatchView | None:
    """The batch with its counts; None when unknown."""
    with session_scope(config.database_url) as session:
        found = store.batch_views(session, [batch_id])
    return found[0] if found else None


def cancel(config: WorkerConfig, batch_id: int) -> store.CancelReport:
    """Cancel a batch (:func:`db.batches.cancel_batch`)."""
    with session_scope(config.database_url) as session:
        return store.cancel_batch(session, batch_id)


def retry(config: WorkerConfig, batch_id: int) -> int | None:
    """Queue a batch's failed items again (:func:`db.batches.retry_batch`); None when unknown."""
    with session_scope(config.database_url) as session:
        return store.retry_batch(session, batch_id)


_ACTIVE = (store.BatchState.QUEUED, store.BatchState.RUNNING)


def follow(
    config: WorkerConfig,
    publish: Publish,
    batch_id: int,
    *,
    on_progress: Callable[[store.BatchView], None],
    interval: float = 0.5,
    timeout: float | None = None,
) -> store.BatchView:
    """Publish the batch's items while it runs, reporting progress, until it is done or cancelled.

    Raises:
        LookupError: when the batch is unknown.
        TimeoutError: when ``timeout`` seconds passed first.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pump_once(config, publish, batch_ids=[batch_id])
        current = view(config, batch_id)
        if current is None:
            raise LookupError(f"batch_id: no batch {batch_id}")
        on_progress(current)
        if current.state not in _ACTIVE:
            return current
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} still {current.state.value}")
        time.sleep(interval)
