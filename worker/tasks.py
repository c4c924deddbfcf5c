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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from celery import Celery, Task, current_app, shared_task
from celery.exceptions import Retry
from celery.signals import worker_process_init, worker_ready, worker_shutdown
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from sqlalchemy.orm import Session

from db import batches as batch_items
from db import repository as repo
from db.engine import get_engine, session_scope
from db.models import JobKind, JobStatus, StudyStatus
from worker.config import WorkerConfig
from worker.heartbeat import job_alive
from worker.queues import QueueName

if TYPE_CHECKING:
    from worker.batcher import BatchingPredictor
    from worker.pipeline import StageTimer
    from worker.predictor import Predictor

__all__ = [
    "AttemptError",
    "CONFIG_KEY",
    "DB_RETRY_MAX_SECONDS",
    "DELIVER_RESULT",
    "LOST_ATTEMPT_ERROR",
    "MAX_BACKOFF_SECONDS",
    "PROCESS_STUDY",
    "attempts_exhausted_reason",
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


class AttemptError(Exception):
    """What a retry carries to Celery's log: the recorded error text, nothing more."""


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, SQLAlchemyError):
        # Its text quotes the SQL statement and its parameters: name the types only.
        orig = getattr(exc, "orig", None)
        return f"{type(exc).__name__}: {type(orig).__name__ if orig is not None else 'database'}"
    # Exception type and message only: our code never puts PHI in messages.
    return f"{type(exc).__name__}: {exc}"[:1000]


def attempts_exhausted_reason(attempts: int, last_error: str | None) -> str:
    """The ``last_error`` of a study dead-lettered because its attempts are used up."""
    why = last_error or "no outcome recorded (worker lost)"
    return f"dead-letter after {attempts} attempt(s); last: {why}"[:1000]


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
    """Load the model once per worker process, before the first study arrives; own DB pool.

    A worker makes its app the current one before it forks its pool, so the
    configuration is the one the worker was started with.
    """
    try:
        config = worker_config_of(current_app)
    except LookupError:
        return  # not one of our apps
    # A child forked after the main process's heartbeat and reconciler threads
    # opened connections inherits their pool: start a fresh one, leaving the
    # parent's connections open for the parent (SQLAlchemy's fork recipe).
    get_engine(config.database_url).dispose(close=False)
    try:
        if config.torch_threads:
            import torch

            torch.set_num_threads(config.torch_threads)
        if not config.worker_warmup:
            return
        _serving_predictor(config)  # the active model (or PNEUMO_MODEL_PATH), checked
    except Exception as exc:  # the task will report a real failure; do not kill the pool
        log.warning("model warm-up failed: %s", type(exc).__name__)


# --- the model this process serves with: shared by its threads, batched -----------

_studies_in_flight = 1
"""How many studies this process runs at once (a threads pool's concurrency)."""
_serving: BatchingPredictor | None = None
_serving_lock = threading.Lock()


def _serving_predictor(config: WorkerConfig) -> Predictor:
    """:func:`~worker.pipeline.default_predictor` behind this process's :class:`BatchingPredictor`.

    Batching across studies only when this process runs several at once (a
    threads pool): a lone study would only wait out the window. A new model
    (the default predictor changed) gets a new batcher; the old one serves
    what is pending and then runs callers directly.

    Raises:
        model.inference.WeightsError: the model cannot be loaded.
    """
    global _serving
    from worker.batcher import BatchingPredictor
    from worker.pipeline import default_predictor
    from worker.predictor import single_pass

    model = default_predictor(config)
    single = single_pass(model)
    if single is None:
        return model
    window = config.batch_window_ms if _studies_in_flight > 1 else 0.0
    with _serving_lock:
        old = current = _serving
        if current is None or current.inner is not single or current.max_wait_ms != window:
            current = BatchingPredictor(single, max_images=config.batch_size, max_wait_ms=window)
            _serving = current
    if old is not None and old is not current:
        old.close()
    current.take_forward_sizes()  # a new study in this thread: count its passes from here
    return current


@worker_ready.connect
def _serve_threads(sender: Any = None, **_: Any) -> None:
    """In a threads (or solo) pool, share one model between the studies in flight; warm it up.

    Prefork children warm up in :func:`_warm_up` instead, each for itself.
    """
    global _studies_in_flight
    from celery.concurrency.prefork import TaskPool as PreforkPool

    pool = getattr(sender, "pool", None)
    app = getattr(sender, "app", None)
    if pool is None or isinstance(pool, PreforkPool) or not isinstance(app, Celery):
        return
    try:
        config = worker_config_of(app)
    except LookupError:
        return  # not one of our apps
    _studies_in_flight = max(1, int(getattr(pool, "limit", 1) or 1))
    try:
        if config.torch_threads:
            import torch

            torch.set_num_threads(config.torch_threads)
        if config.worker_warmup:
            _serving_predictor(config)
    except Exception as exc:  # the task will report a real failure
        log.warning("model warm-up failed: %s", type(exc).__name__)


@worker_shutdown.connect
def _stop_serving(**_: Any) -> None:
    """Let the batcher finish what is pending (a warm shutdown waited for the tasks)."""
    global _serving
    with _serving_lock:
        current, _serving = _serving, None
    if current is not None:
        current.close(timeout=30.0)


# --- process_study ------------------------------------------------------------

_DB_UNAVAILABLE = (OperationalError, InterfaceError, SQLAlchemyTimeoutError)
"""Database errors that say "not reachable now", not "this study is bad": retried, never counted."""

DB_RETRY_MAX_SECONDS = 30.0
"""Longest wait between tries while the database is unreachable."""

LOST_ATTEMPT_ERROR = "WorkerLost: the attempt ended without a recorded outcome"
"""``job.error`` of an attempt whose worker died, was killed at the time limit, or lost the task."""


@dataclass(frozen=True)
class _Attempt:
    """A processing attempt recorded in the database."""

    job_id: int
    number: int
    """0 for the first attempt of this revision since it was queued; counted from job rows."""
    queue_wait: float | None
    """Seconds the study waited in the queue (None when not known)."""


def _close_lost(
    session: Session, config: WorkerConfig, study_id: int, revision: int, task_id: str | None
) -> bool:
    """Close the study's ``running`` attempts that are lost; False when one is alive elsewhere.

    A running job with our own task id is a previous delivery of this very
    message (its pool child or worker died, or the hard time limit killed it):
    lost. Another task's job is lost unless its worker's heartbeat says it is
    still running (:func:`worker.heartbeat.job_alive`).
    """
    jobs = repo.running_jobs(session, study_id, revision)
    beats = repo.heartbeats(session, [j.worker for j in jobs if j.worker])
    now = datetime.now(UTC)
    lost: list[int] = []
    for job in jobs:
        own = task_id is not None and job.task_id == task_id
        beat = beats.get(job.worker or "")
        if not own and job_alive(job, beat, now=now, stale_seconds=config.heartbeat_stale_seconds):
            return False
        lost.append(job.job_id)
    if lost:
        log.warning("study id %d: %d attempt(s) lost with their worker", study_id, len(lost))
    repo.close_lost_jobs(session, lost, LOST_ATTEMPT_ERROR)
    return True


def _begin(
    config: WorkerConfig, study_id: int, revision: int, context: dict[str, Any]
) -> _Attempt | str:
    """Count and record the attempt (a job row, the study ``processing``), or say why not.

    One transaction with the study row locked: the attempt is counted *before*
    any work, so an attempt whose worker is killed still counts, and after
    ``task_max_retries + 1`` attempts the study is dead-lettered with the reason.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: when the database fails (nothing recorded).
    """
    with session_scope(config.database_url) as session:
        state = repo.study_state(session, study_id, lock=True)
        if state is None:
            log.error("process_study: study id %d unknown; dropping message", study_id)
            return "unknown-study"
        if state.revision > revision:  # an amendment superseded this revision
            batch_items.finish_item(session, study_id, revision, batch_items.BatchItemState.FAILED,
                                    f"superseded by revision {state.revision}")  # fmt: skip
            return "superseded"
        if batch_items.item_cancelled(session, study_id, revision):
            return "cancelled"  # its batch was cancelled before this attempt started
        if state.status in (StudyStatus.DONE, StudyStatus.DEAD_LETTER):
            return f"already-{state.status.value}"  # a duplicate wake-up
        if not _close_lost(session, config, study_id, revision, context["task_id"]):
            return "running-elsewhere"  # a duplicate wake-up; that attempt decides
        attempts = repo.count_attempts(session, study_id, revision, since=state.queued_at)
        if attempts > config.task_max_retries:
            reason = attempts_exhausted_reason(
                attempts, repo.last_job_error(session, study_id, revision)
            )
            repo.set_study_status(
                session, study_id, StudyStatus.DEAD_LETTER, error=reason, revision=revision
            )
            batch_items.finish_item(
                session, study_id, revision, batch_items.BatchItemState.FAILED, reason
            )
            log.warning("study id %d: dead-letter after %d attempt(s)", study_id, attempts)
            return StudyStatus.DEAD_LETTER.value
        context = dict(context, attempt=attempts)
        job_id = repo.start_job(
            session, study_id=study_id, kind=JobKind.PROCESS, revision=revision, **context
        )
        repo.set_study_status(session, study_id, StudyStatus.PROCESSING, revision=revision)
    return _Attempt(job_id, attempts, _seconds_since(state.queued_at))


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


def _db_retry(task: Task[Any, Any], config: WorkerConfig, exc: Exception) -> Retry:
    """A retry for a database that cannot be reached: nothing is acknowledged unrecorded."""
    retries = int(task.request.retries or 0)
    base = max(0.1, config.task_retry_backoff_seconds)
    countdown = min(backoff_seconds(retries, base), DB_RETRY_MAX_SECONDS)
    log.warning("database unavailable (%s); trying again in %.1fs", type(exc).__name__, countdown)
    return task.retry(exc=AttemptError(_error_text(exc)), countdown=countdown)


def _recorded(
    task: Task[Any, Any], body: Callable[..., dict[str, Any]], *args: Any
) -> dict[str, Any]:
    """Run a task body with the task's config; a database outage becomes a retry, not an ack.

    Raises:
        celery.exceptions.Retry: when the database could not be reached.
    """
    config = worker_config_of(task.app)
    try:
        return body(task, config, *args)
    except _DB_UNAVAILABLE as exc:
        raise _db_retry(task, config, exc) from exc


@shared_task(bind=True, name=PROCESS_STUDY, max_retries=None)
def process_study(self: Task[Any, Any], study_id: int, revision: int) -> dict[str, Any]:
    """Run the pipeline for one revision of one study, then deliver the result.

    Raises:
        celery.exceptions.Retry: when the attempt failed and attempts remain, or
            the database could not be reached (then nothing is acknowledged
            before the outcome can be recorded).
    """
    return _recorded(self, _process, study_id, revision)


def _process(
    task: Task[Any, Any], config: WorkerConfig, study_id: int, revision: int
) -> dict[str, Any]:
    from worker.pipeline import StageTimer, run_study

    context = _job_context(task)
    attempt = _begin(config, study_id, revision, context)
    if isinstance(attempt, str):
        return {"study_id": study_id, "status": attempt}

    timer = StageTimer()
    try:
        if config.fault_test_delay_seconds:
            time.sleep(config.fault_test_delay_seconds)
        with timer.stage("load_model"):
            predictor = _serving_predictor(config)
        outcome = run_study(config, study_id, revision, predictor=predictor, timer=timer)
    except _DB_UNAVAILABLE:
        raise  # not the study's fault: retried; the open job is closed as lost next time
    except Exception as exc:
        return _fail_or_retry(task, config, study_id, revision, attempt, exc)

    if attempt.queue_wait is not None:
        timer.seconds["queue_wait"] = attempt.queue_wait
    _record_forwards(predictor, timer)
    failed = _send_now(config, outcome.result_id, timer) if outcome.files else []
    with session_scope(config.database_url) as session:
        repo.update_timings(session, outcome.result_id, timer.seconds)
        repo.finish_job(session, attempt.job_id, JobStatus.SUCCEEDED)
        repo.set_study_status(session, study_id, StudyStatus.DONE, revision=revision)
        batch_items.finish_item(session, study_id, revision, batch_items.BatchItemState.DONE)
    for destination in failed:
        # Its own task: retried from the stored files, without re-running the model.
        # Lost, it is found by the reconciler (the delivery row stays failed).
        task.app.send_task(
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


def _record_forwards(predictor: Predictor, timer: StageTimer) -> None:
    """Count the passes this study led by image count (``pneumo_inference_batch_size``)."""
    from worker.batcher import FORWARD_TIMING_PREFIX, BatchingPredictor

    if isinstance(predictor, BatchingPredictor):
        for images in predictor.take_forward_sizes():
            key = f"{FORWARD_TIMING_PREFIX}{images}"
            timer.seconds[key] = timer.seconds.get(key, 0.0) + 1.0


def _fail_or_retry(
    task: Task[Any, Any],
    config: WorkerConfig,
    study_id: int,
    revision: int,
    attempt: _Attempt,
    exc: Exception,
) -> dict[str, Any]:
    """Record a failed attempt; retry with backoff, or dead-letter after the last.

    The attempt number comes from the database (:func:`_begin`), so attempts
    lost with their worker count as well.

    Raises:
        celery.exceptions.Retry: when another attempt is scheduled.
        sqlalchemy.exc.SQLAlchemyError: when the failure cannot be recorded.
    """
    last = attempt.number >= config.task_max_retries
    error = _error_text(exc)
    log.warning(
        "study id %d attempt %d failed (%s)%s",
        study_id,
        attempt.number + 1,
        type(exc).__name__,
        "; dead-letter" if last else "; will retry",
    )
    with session_scope(config.database_url) as session:
        repo.finish_job(
            session, attempt.job_id, JobStatus.DEAD_LETTER if last else JobStatus.RETRYING, error
        )
        repo.set_study_status(
            session,
            study_id,
            StudyStatus.DEAD_LETTER if last else StudyStatus.FAILED,
            error=attempts_exhausted_reason(attempt.number + 1, error) if last else error,
            revision=revision,
        )
        if last:
            batch_items.finish_item(
                session, study_id, revision, batch_items.BatchItemState.FAILED, error
            )
    if last:
        return {"study_id": study_id, "status": StudyStatus.DEAD_LETTER.value}
    base = max(0.1, config.task_retry_backoff_seconds)
    raise task.retry(exc=AttemptError(error), countdown=backoff_seconds(attempt.number, base))


# --- deliver_result -------------------------------------------------------------


@shared_task(bind=True, name=DELIVER_RESULT, max_retries=None)
def deliver_result(self: Task[Any, Any], result_id: int, destination: str) -> dict[str, Any]:
    """Send an already-stored result to one destination; retried on its own.

    Raises:
        celery.exceptions.Retry: when the send failed and attempts remain, or
            the database could not be reached.
    """
    return _recorded(self, _deliver, result_id, destination)


def _deliver(
    task: Task[Any, Any], config: WorkerConfig, result_id: int, destination: str
) -> dict[str, Any]:
    from worker.delivery import deliver

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
            **_job_context(task),
        )
    try:
        outcome = deliver(config, result_id, destination, retries=0)
        ok, error = outcome.ok, outcome.error
    except (Retry, *_DB_UNAVAILABLE):
        raise
    except Exception as exc:
        ok, error = False, _error_text(exc)
    retries = int(task.request.retries or 0)
    last = retries >= max(1, config.send_retries)
    status = JobStatus.SUCCEEDED if ok else JobStatus.DEAD_LETTER if last else JobStatus.RETRYING
    with session_scope(config.database_url) as session:
        repo.finish_job(session, job_id, status, None if ok else error)
    if ok or last:
        return {"result_id": result_id, "destination": destination, "ok": ok}
    base = max(0.1, config.send_backoff_seconds)
    raise task.retry(countdown=backoff_seconds(retries, base))
