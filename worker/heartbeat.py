"""Worker heartbeats in the database: how the rest of the system knows a worker is alive.

Each Celery worker's main process writes one ``worker_heartbeat`` row (keyed by
its node name, the ``worker_host`` of its job rows) every
``heartbeat_interval_seconds``, with the ids of the tasks it is running at
that moment. A ``running`` job is alive when its worker's row is fresher than
``heartbeat_stale_seconds`` and either lists the job's task or is older than
the job (:func:`job_alive`). Anything else is a lost attempt: the worker was
SIGKILLed, its host died, the pool child was killed, or the task was cancelled
on a broker connection loss. :mod:`worker.reconciler` re-enqueues such
studies, and :func:`worker.tasks.process_study` counts them as attempts.

The database, not the broker, is the judge: this works with any broker, and
takes no Celery events or remote-control round trips (Celery's own
``--without-heartbeat`` broker events stay off).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta

from db import repository as repo
from db.engine import session_scope
from worker.config import WorkerConfig

__all__ = ["Heartbeat", "active_task_ids", "aware", "host_of", "job_alive"]

log = logging.getLogger(__name__)

_STARTUP_GRACE = timedelta(seconds=2)
"""A job that started this close to (or after) its worker's last beat is not in it yet."""


def aware(moment: datetime) -> datetime:
    """``moment`` as an aware UTC datetime (SQLite returns naive ones; we store UTC)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def job_alive(
    job: repo.RunningJob, beat: repo.Beat | None, *, now: datetime, stale_seconds: float
) -> bool:
    """Whether a ``running`` job is still being worked on, by its worker's heartbeat.

    Alive: the worker beat within ``stale_seconds`` and its beat lists the
    job's task, or the job started after (or just before) that beat.
    Not alive: no beat at all, a stale one, or a fresh one without the task.
    """
    if beat is None:
        return False
    beat_at = aware(beat.beat_at)
    if beat_at < now - timedelta(seconds=stale_seconds):
        return False
    if job.task_id is not None and job.task_id in beat.active_tasks:
        return True
    return aware(job.started_at) >= beat_at - _STARTUP_GRACE


def host_of(node_name: str) -> str:
    """The host part of a Celery node name (``name@host``); this machine's name without one.

    ``pneumo worker`` names its node ``pneumo-<pid>@<hostname>`` unless
    ``--hostname`` says otherwise, so the heartbeat row tells on which host a
    worker runs, and workers started as ``w1@hostA``, ``w2@hostB`` on one
    machine (a scale-out test) are told apart as hosts too.
    """
    _, at, host = node_name.rpartition("@")
    return host if at and host else socket.gethostname()


def active_task_ids() -> list[str]:
    """The ids of the tasks this worker process is running (Celery's own bookkeeping)."""
    from celery.worker import state

    for _ in range(5):  # a WeakSet the consumer changes while we copy it
        try:
            return sorted({str(request.id) for request in list(state.active_requests)})
        except RuntimeError:
            continue
    return []


class Heartbeat(threading.Thread):
    """A daemon thread writing ``worker``'s heartbeat row until :meth:`stop`.

    A database outage is logged (once per outage) and waited out: the beats
    resume when it returns. :meth:`stop` removes the row, so a worker shut
    down cleanly is not waited for.
    """

    def __init__(
        self,
        config: WorkerConfig,
        worker: str,
        *,
        active: Callable[[], Iterable[str]] = active_task_ids,
    ) -> None:
        super().__init__(name="pneumo-heartbeat", daemon=True)
        self.config = config
        self.worker = worker
        self._active = active
        self._stop_event = threading.Event()
        self._failing = False

    def beat(self) -> bool:
        """Write one heartbeat now; False (logged) when the database refused it."""
        try:
            with session_scope(self.config.database_url) as session:
                repo.record_heartbeat(
                    session,
                    self.worker,
                    hostname=host_of(self.worker),
                    pid=os.getpid(),
                    active_tasks=list(self._active()),
                )
        except Exception as exc:  # the database may be down: keep beating when it returns
            if not self._failing:
                log.warning("heartbeat of %s not written: %s", self.worker, type(exc).__name__)
            self._failing = True
            return False
        if self._failing:
            log.info("heartbeat of %s written again", self.worker)
        self._failing = False
        return True

    def run(self) -> None:
        while True:
            self.beat()
            if self._stop_event.wait(self.config.heartbeat_interval_seconds):
                return

    def stop(self, timeout: float = 5.0) -> None:
        """Stop beating and remove the row (best effort: a dead database is not waited for)."""
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout)
        try:
            with session_scope(self.config.database_url) as session:
                repo.remove_heartbeat(session, self.worker)
        except Exception as exc:
            log.warning("heartbeat of %s not removed: %s", self.worker, type(exc).__name__)
