"""Celery tasks: ``process_study`` (inference) and ``deliver_result`` (sending).

Both are idempotent (see :mod:`worker.pipeline`), retry with exponential
backoff a bounded number of times, and record every attempt as a ``job`` row.
After the last failed attempt the study is marked ``dead-letter`` (processing)
or the delivery ``failed`` (sending) and the message is acknowledged, so a
poisonous study cannot loop forever. Only ids, UIDs and destination strings
travel through the broker.

Each task reads its :class:`~worker.config.WorkerConfig` from its app
(:func:`worker_config_of`), put there by :func:`worker.app.create_app`.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from celery import Celery, Task, current_app, shared_task
from celery.exceptions import Retry
from celery.signals import worker_process_init

from db import repository as repo
from db.engine import session_scope
from db.models import JobKind, JobStatus, StudyStatus
from worker.config import WorkerConfig
from worker.queues import QueueName

if TYPE_CHECKING:
    from worker.pipeline import StageTimer

__all__ = [
    "CONFIG_KEY",
    "DELIVER_RESULT",
    "MAX_BACKOFF_SECONDS",
    "PROCESS_STUDY",
    "backoff_seconds",
    "deliver_result",
    "process_study",
    "worker_config_of",
]

log = logging.getLogger(__name__)

PROCESS_STUDY = "pneumo.process_study"
DELIVER_RESULT = "pneumo.deliver_result"
CONFIG_KEY = "pneumo_worker_config"
"""The key of the app's configuration under which :func:`create_app` keeps the WorkerConfig."""
MAX_BACKOFF_SECONDS = 300.0


def worker_config_of(app: Celery) -> WorkerConfig:
    """The :class:`WorkerConfig` an app was created with.

    Raises:
        LookupError: when the app was not built by :func:`worker.app.create_app`.
    """
    config = app.conf.get(CONFIG_KEY)
    if not isinstance(config, WorkerConfig):
        raise LookupError("this Celery app has no WorkerConfig: build it with create_app()")
    return config


def backoff_seconds(retries: int, base: float = 5.0) -> float:
    """Exponential backoff: base, 2·base, 4·base, ... capped at five minutes."""
    return float(min(base * 2.0**retries, MAX_BACKOFF_SECONDS))


def _error_text(exc: BaseException) -> str:
    # Exception type and message only: our code never puts PHI in messages.
    return f"{type(exc).__name__}: {exc}"[:1000]


def _seconds_since(moment: datetime | None) -> float | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # SQLite returns naive datetimes; we store UTC
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (datetime.now(UTC) - moment).total_seconds())


def _job_context(task: Task[Any, Any]) -> dict[str, Any]:
    request = task.request
    delivery = request.delivery_info or {}
    return {
        "task_id": request.id,
        "queue": delivery.get("routing_key") or delivery.get("queue"),
        "worker_host": request.hostname or socket.gethostname(),
        "attempt": int(request.retries or 0),
    }


@worker_process_init.connect
def _warm_up(**_: Any) -> None:
    """Load the model once per worker process, before the first study arrives.

    A worker makes its app the current one before it forks its pool, so the
    configuration is the one the worker was started with.
    """
    try:
        config = worker_config_of(current_app)
    except LookupError:
        return  # not one of our apps
    try:
        if config.torch_threads:
            import torch

            torch.set_num_threads(config.torch_threads)
        if not config.worker_warmup:
            return
        from model.inference import load_predictor

        load_predictor(config.model_path)
    except Exception as exc:  # the task will report a real failure; do not kill the pool
        log.warning("model warm-up failed: %s", type(exc).__name__)


# --- process_study ------------------------------------------------------------


@dataclass(frozen=True)
class _Attempt:
    """A processing attempt recorded in the database."""

    job_id: int
    queue_wait: float | None
    """Seconds the study waited in the queue (None when not known)."""


def _begin(
    config: WorkerConfig, study_id: int, revision: int, context: dict[str, Any]
) -> _Attempt | str:
    """Record the attempt (a job row, the study ``processing``), or say why there is none."""
    with session_scope(config.database_url) as session:
        state = repo.study_state(session, study_id)
        if state is None:
            log.error("process_study: study id %d unknown; dropping message", study_id)
            return "unknown-study"
        if state.revision > revision:  # an amendment superseded this revision
            return "superseded"
        job_id = repo.start_job(
            session, study_id=study_id, kind=JobKind.PROCESS, revision=revision, **context
        )
        repo.set_study_status(session, study_id, StudyStatus.PROCESSING, revision=revision)
    return _Attempt(job_id, _seconds_since(state.queued_at))


def _send_now(config: WorkerConfig, result_id: int, timer: StageTimer) -> list[str]:
    """One quick send to each destination; returns those that failed."""
    from worker.delivery import deliver

    failed: list[str] = []
    for destination in config.destinations:
        try:
            with timer.stage(f"send:{destination}"):
                ok = deliver(config, result_id, destination, retries=0).ok
        except Exception as exc:  # the result is stored; sending is retried on its own
            log.warning(
                "result %d: send to %s raised %s", result_id, destination, type(exc).__name__
            )
            ok = False
        if not ok:
            failed.append(str(destination))
    return failed


@shared_task(bind=True, name=PROCESS_STUDY, max_retries=None)
def process_study(self: Task[Any, Any], study_id: int, revision: int) -> dict[str, Any]:
    """Run the pipeline for one revision of one study, then deliver the result."""
    from worker.pipeline import StageTimer, run_study

    config = worker_config_of(self.app)
    context = _job_context(self)
    attempt = _begin(config, study_id, revision, context)
    if isinstance(attempt, str):
        return {"study_id": study_id, "status": attempt}

    timer = StageTimer()
    try:
        outcome = run_study(config, study_id, revision, timer=timer)
    except Exception as exc:
        return _fail_or_retry(self, config, study_id, revision, attempt.job_id, exc)

    if attempt.queue_wait is not None:
        timer.seconds["queue_wait"] = attempt.queue_wait
    failed = _send_now(config, outcome.result_id, timer) if outcome.files else []
    with session_scope(config.database_url) as session:
        repo.update_timings(session, outcome.result_id, timer.seconds)
        repo.finish_job(session, attempt.job_id, JobStatus.SUCCEEDED)
        repo.set_study_status(session, study_id, StudyStatus.DONE, revision=revision)
    for destination in failed:
        # Its own task: retried from the stored files, without re-running the model.
        self.app.send_task(
            DELIVER_RESULT,
            args=[outcome.result_id, destination],
            queue=context["queue"] or QueueName.REALTIME.value,
            countdown=config.send_backoff_seconds,
        )
    return {
        "study_id": study_id,
        "revision": revision,
        "result_id": outcome.result_id,
        "status": outcome.status.value,
    }


def _fail_or_retry(
    task: Task[Any, Any],
    config: WorkerConfig,
    study_id: int,
    revision: int,
    job_id: int,
    exc: Exception,
) -> dict[str, Any]:
    """Record a failed attempt; retry with backoff, or dead-letter after the last.

    Raises:
        celery.exceptions.Retry: when another attempt is scheduled.
    """
    retries = int(task.request.retries or 0)
    last = retries >= config.task_max_retries
    error = _error_text(exc)
    log.warning(
        "study id %d attempt %d failed (%s)%s",
        study_id,
        retries + 1,
        type(exc).__name__,
        "; dead-letter" if last else "; will retry",
    )
    with session_scope(config.database_url) as session:
        repo.finish_job(
            session, job_id, JobStatus.DEAD_LETTER if last else JobStatus.RETRYING, error
        )
        repo.set_study_status(
            session,
            study_id,
            StudyStatus.DEAD_LETTER if last else StudyStatus.FAILED,
            error=error,
            revision=revision,
        )
    if last:
        return {"study_id": study_id, "status": StudyStatus.DEAD_LETTER.value}
    base = max(0.1, config.task_retry_backoff_seconds)
    raise task.retry(exc=exc, countdown=backoff_seconds(retries, base))


# --- deliver_result -------------------------------------------------------------


@shared_task(bind=True, name=DELIVER_RESULT, max_retries=None)
def deliver_result(self: Task[Any, Any], result_id: int, destination: str) -> dict[str, Any]:
    """Send an already-stored result to one destination; retried on its own.

    Raises:
        celery.exceptions.Retry: when the send failed and attempts remain.
    """
    from worker.delivery import deliver

    config = worker_config_of(self.app)
    with session_scope(config.database_url) as session:
        owner = repo.result_study(session, result_id)
        if owner is None:
            return {"result_id": result_id, "status": "unknown-result"}
        study_id, revision = owner
        job_id = repo.start_job(
            session,
            study_id=study_id,
            kind=JobKind.DELIVER,
            revision=revision,
            **_job_context(self),
        )
    try:
        outcome = deliver(config, result_id, destination, retries=0)
        ok, error = outcome.ok, outcome.error
    except Retry:
        raise
    except Exception as exc:
        ok, error = False, _error_text(exc)
    retries = int(self.request.retries or 0)
    last = retries >= max(1, config.send_retries)
    status = JobStatus.SUCCEEDED if ok else JobStatus.DEAD_LETTER if last else JobStatus.RETRYING
    with session_scope(config.database_url) as session:
        repo.finish_job(session, job_id, status, None if ok else error)
    if ok or last:
        return {"result_id": result_id, "destination": destination, "ok": ok}
    base = max(0.1, config.send_backoff_seconds)
    raise self.retry(countdown=backoff_seconds(retries, base))
