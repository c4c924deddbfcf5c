"""Celery tasks: ``process_study`` (inference) and ``deliver_result`` (sending).

Both are idempotent (see :mod:`worker.pipeline`), retry with exponential
backoff a bounded number of times, and record every attempt as a ``job`` row.
After the last failed attempt the study is marked ``dead-letter`` (processing)
or the delivery ``failed`` (sending) and the message is acknowledged, so a
poisonous study cannot loop forever. Only ids, UIDs and destination strings
travel through the broker.
"""

from __future__ import annotations

import logging
import socket
from datetime import datetime, timezone
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Retry
from celery.signals import worker_process_init

from db import repository as repo
from db.engine import session_scope
from db.models import JobKind, JobStatus, Study, StudyStatus
from pneumo.settings import Settings, load_settings

log = logging.getLogger(__name__)

PROCESS_STUDY = "pneumo.process_study"
DELIVER_RESULT = "pneumo.deliver_result"
MAX_BACKOFF_SECONDS = 300.0


def _settings(task: Task) -> Settings:
    settings = getattr(task.app.conf, "pneumo_settings", None)
    return settings if isinstance(settings, Settings) else load_settings()


def backoff_seconds(retries: int, base: float = 5.0) -> float:
    """Exponential backoff: base, 2·base, 4·base, ... capped at five minutes."""
    return min(base * (2**retries), MAX_BACKOFF_SECONDS)


def _error_text(exc: BaseException) -> str:
    # Exception type and message only: our code never puts PHI in messages.
    return f"{type(exc).__name__}: {exc}"[:1000]


def _seconds_since(moment: datetime | None) -> float | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # SQLite returns naive datetimes; we store UTC
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, (datetime.now(timezone.utc) - moment).total_seconds())


def _job_context(task: Task) -> dict[str, Any]:
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
    """Load the model once per worker process, before the first study arrives."""
    settings = load_settings()
    try:
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        if not settings.worker_warmup:
            return
        from model.inference import load_predictor

        load_predictor(settings.model_path)
    except Exception as exc:  # the task will report a real failure; do not kill the pool
        log.warning("model warm-up failed: %s", type(exc).__name__)


@shared_task(bind=True, name=PROCESS_STUDY, max_retries=None)
def process_study(self: Task, study_id: int, revision: int) -> dict[str, Any]:
    """Run the pipeline for one revision of one study, then deliver the result."""
    from worker.delivery import deliver
    from worker.pipeline import StageTimer, run_study

    settings = _settings(self)
    url = settings.effective_database_url
    context = _job_context(self)
    with session_scope(url) as session:
        study = session.get(Study, study_id)
        if study is None:
            log.error("process_study: study id %d unknown; dropping message", study_id)
            return {"study_id": study_id, "status": "unknown-study"}
        if study.revision > revision:  # an amendment superseded this revision
            return {"study_id": study_id, "status": "superseded"}
        queue_wait = _seconds_since(study.queued_at)
        job_id = repo.start_job(
            session, study_id=study_id, kind=JobKind.PROCESS, revision=revision, **context
        )
        repo.set_study_status(session, study_id, StudyStatus.PROCESSING, revision=revision)

    timer = StageTimer()
    try:
        outcome = run_study(settings, study_id, revision, timer=timer)
    except Exception as exc:
        return _fail_or_retry(self, settings, study_id, revision, job_id, exc)

    if queue_wait is not None:
        timer.seconds["queue_wait"] = queue_wait
    failed_destinations = []
    if outcome.files:
        for destination in settings.destinations:
            try:
                with timer.stage(f"send:{destination}"):
                    ok = deliver(settings, outcome.result_id, destination, retries=0).ok
            except Exception as exc:  # the result is stored; sending is retried on its own
                log.warning("result %d: send to %s raised %s", outcome.result_id,
                            destination, type(exc).__name__)
                ok = False
            if not ok:
                failed_destinations.append(str(destination))
    with session_scope(url) as session:
        repo.update_timings(session, outcome.result_id, timer.seconds)
        repo.finish_job(session, job_id, JobStatus.SUCCEEDED)
        repo.set_study_status(session, study_id, StudyStatus.DONE, revision=revision)
    for destination in failed_destinations:
        # Its own task: retried from the stored files, without re-running the model.
        self.app.send_task(
            DELIVER_RESULT,
            args=[outcome.result_id, destination],
            queue=context["queue"] or "realtime",
            countdown=settings.send_backoff_seconds,
        )
    return {
        "study_id": study_id,
        "revision": revision,
        "result_id": outcome.result_id,
        "status": outcome.status.value,
    }


def _fail_or_retry(
    task: Task, settings: Settings, study_id: int, revision: int, job_id: int, exc: Exception
) -> dict[str, Any]:
    url = settings.effective_database_url
    retries = int(task.request.retries or 0)
    last = retries >= settings.task_max_retries
    error = _error_text(exc)
    log.warning(
        "study id %d attempt %d failed (%s)%s",
        study_id, retries + 1, type(exc).__name__, "; dead-letter" if last else "; will retry",
    )
    with session_scope(url) as session:
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
    raise task.retry(exc=exc, countdown=backoff_seconds(retries, _retry_base(settings)))


def _retry_base(settings: Settings) -> float:
    return max(0.1, settings.task_retry_backoff_seconds)


@shared_task(bind=True, name=DELIVER_RESULT, max_retries=None)
def deliver_result(self: Task, result_id: int, destination: str) -> dict[str, Any]:
    """Send an already-stored result to one destination; retried on its own."""
    from db.models import Result
    from worker.delivery import deliver

    settings = _settings(self)
    url = settings.effective_database_url
    context = _job_context(self)
    with session_scope(url) as session:
        result = session.get(Result, result_id)
        if result is None:
            return {"result_id": result_id, "status": "unknown-result"}
        job_id = repo.start_job(
            session, study_id=result.study_id, kind=JobKind.DELIVER,
            revision=result.revision, **context,
        )
    try:
        outcome = deliver(settings, result_id, destination, retries=0)
        error = outcome.error
        ok = outcome.ok
    except Retry:
        raise
    except Exception as exc:
        ok, error = False, _error_text(exc)
    retries = int(self.request.retries or 0)
    last = retries >= max(1, settings.send_retries)
    with session_scope(url) as session:
        status = (
            JobStatus.SUCCEEDED if ok else JobStatus.DEAD_LETTER if last else JobStatus.RETRYING
        )
        repo.finish_job(session, job_id, status, None if ok else error)
    if ok or last:
        return {"result_id": result_id, "destination": destination, "ok": ok}
    raise self.retry(countdown=backoff_seconds(retries, max(0.1, settings.send_backoff_seconds)))
