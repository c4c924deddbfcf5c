"""The Celery application factory: one :class:`~worker.config.WorkerConfig` in, one app out.

Nothing here reads the environment or builds an app at import time; the
``pneumo`` layer builds the one app of a process from its settings
(:mod:`pneumo.celery_app`, which ``celery -A pneumo.celery_app worker`` and
``pneumo worker`` both use). Tasks find their configuration on their app
(:func:`worker_config_of`).

No-loss settings and why:

* ``task_acks_late``: a message is acknowledged after the task finished, so a
  worker that dies mid-task leaves it in the broker to be redelivered.
* ``task_reject_on_worker_lost``: a pool child killed (OOM, segfault) requeues
  its message instead of acking it as failed; the attempt was counted in the
  database when it started, so requeues are bounded (:mod:`worker.tasks`).
* ``task_acks_on_timeout = False``: a task killed at the hard time limit is
  requeued, not acknowledged; the next delivery records the lost attempt
  (counted, dead-lettered after the last). ``task_acks_on_failure`` stays on:
  a task that raised has recorded its outcome, or the reconciler finds the
  study stale by its heartbeat (:mod:`worker.reconciler`).
* a database that cannot be reached when a task starts or ends is retried
  (``self.retry``), never acknowledged unrecorded.
* ``worker_prefetch_multiplier = 1``: a worker holds no more messages than it
  runs, so realtime work is never stuck in a busy worker's prefetch buffer
  and priority order is kept.
* ``visibility_timeout`` above the hard time limit: the broker redelivers a
  message only when no worker can still be running it.
* bounded retries with backoff live on the tasks (:mod:`worker.tasks`); after
  the last one the study is marked ``dead-letter`` in the database.

Queues: :data:`worker.queues.QUEUE_PRIORITY`. A worker consuming both takes
realtime first (``queue_order_strategy=priority``), on the production Redis
and on the embedded one (:mod:`worker.embedded_broker`) alike: one transport.

The database, not the broker, holds the state of the work. Each worker's
main process runs two daemon threads, started on ``worker_ready``: a
heartbeat (:mod:`worker.heartbeat`) and the reconciler
(:mod:`worker.reconciler`), which re-publishes wake-ups for stale studies, so a
worker whose host died is replaced within about ``heartbeat_stale_seconds``
plus ``reconcile_interval_seconds``, not after the visibility timeout.

No result backend: results go to our own database. Only ids and UIDs travel
through the broker, never pixels or PHI.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown
from kombu import Exchange, Queue

from worker.config import WorkerConfig
from worker.queues import QUEUE_PRIORITY, QueueName
from worker.tasks import CONFIG_KEY, DELIVER_RESULT, PROCESS_STUDY, worker_config_of

__all__ = [
    "DELIVER_RESULT",
    "PROCESS_STUDY",
    "celery_config",
    "create_app",
    "queue_depths",
    "worker_config_of",
]

_EXCHANGE = "pneumo"

log = logging.getLogger(__name__)


def celery_config(config: WorkerConfig) -> dict[str, object]:
    """The Celery configuration for ``config`` (a plain dict, easy to inspect in tests)."""
    limit = config.task_time_limit_seconds
    exchange = Exchange(_EXCHANGE, type="direct")
    return {
        "broker_url": config.broker_url,
        "broker_transport_options": {
            "visibility_timeout": 2 * limit + 60,
            "queue_order_strategy": "priority",
        },
        "broker_connection_retry_on_startup": True,
        "task_queues": tuple(
            Queue(name.value, exchange, routing_key=name.value) for name in QUEUE_PRIORITY
        ),
        "task_default_queue": QueueName.REALTIME.value,
        "task_default_exchange": _EXCHANGE,
        "task_default_routing_key": QueueName.REALTIME.value,
        "task_create_missing_queues": False,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure": True,
        "task_acks_on_timeout": False,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_time_limit": limit,
        "task_soft_time_limit": max(1, int(limit * 0.9)),
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
        "enable_utc": True,
    }


def create_app(config: WorkerConfig) -> Celery:
    """A Celery app for ``config`` with the pipeline's tasks registered.

    The config is kept on the app (``app.conf.pneumo_worker_config``) for the
    tasks and the worker-process warm-up.

    Raises:
        TypeError: when ``config`` is not a :class:`WorkerConfig`.
    """
    if not isinstance(config, WorkerConfig):
        raise TypeError(f"config must be a WorkerConfig, not {type(config).__name__}")
    app = Celery("pneumo", set_as_current=False)
    app.conf.update(celery_config(config))
    app.conf[CONFIG_KEY] = config
    # worker.tasks (imported above) defines shared tasks: every app gets them.
    app.conf.include = ["worker.tasks"]
    return app


def queue_depths(
    app: Celery, queues: Sequence[QueueName] = QUEUE_PRIORITY
) -> dict[str, int | None]:
    """Messages waiting per queue, by queue name (None when the broker cannot tell).

    Raises:
        kombu.exceptions.OperationalError: when the broker cannot be reached.
    """
    depths: dict[str, int | None] = {}
    with app.connection_for_read() as connection:
        channel: Any = connection.default_channel  # a virtual channel: queue_declare exists
        for queue in queues:
            name = QueueName(queue).value
            try:
                depths[name] = int(channel.queue_declare(queue=name, passive=True).message_count)
            except Exception:
                # Redis reports a never-used queue as missing: nothing waits in it.
                redis = getattr(connection.transport, "driver_type", "") == "redis"
                depths[name] = 0 if redis else None
    return depths


# --- the worker's background threads: heartbeat and reconciler ---------------------

_background: list[Any] = []
_background_lock = threading.Lock()


@worker_ready.connect
def _start_background(sender: Any = None, **_: Any) -> None:
    """Start the heartbeat and the reconciler in a worker's main process (once per process)."""
    from worker.heartbeat import Heartbeat
    from worker.reconciler import CeleryPublisher, Reconciler

    app = getattr(sender, "app", None)
    if not isinstance(app, Celery):
        return
    try:
        config = worker_config_of(app)
    except LookupError:
        return  # not one of our apps
    with _background_lock:
        if _background:
            return  # worker_ready again after a broker reconnection
        threads: list[Any] = [Heartbeat(config, str(sender.hostname))]
        if config.reconcile_interval_seconds > 0:
            threads.append(Reconciler(config, CeleryPublisher(app)))
        for thread in threads:
            thread.start()
        _background.extend(threads)
    log.info("heartbeat and reconciler started for %s", sender.hostname)


@worker_shutdown.connect
def _stop_background(**_: Any) -> None:
    """Stop them at a warm shutdown (after the running tasks ended); the heartbeat row goes."""
    with _background_lock:
        threads = list(reversed(_background))
        _background.clear()
    for thread in threads:
        thread.stop()
