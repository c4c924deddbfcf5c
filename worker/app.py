"""The Celery application, configured from :mod:`pneumo.settings`.

No-loss settings (the issue's list) and why:

* ``task_acks_late``: a message is acknowledged after the task finished, so a
  worker that dies mid-task leaves it in the broker to be redelivered.
* ``task_reject_on_worker_lost``: a pool child killed (OOM, segfault) requeues
  its message instead of acking it as failed.
* ``worker_prefetch_multiplier = 1``: a worker holds no more messages than it
  runs, so realtime work is never stuck in a busy worker's prefetch buffer
  and priority order is kept.
* ``visibility_timeout`` above the hard time limit: the broker redelivers a
  message only when no worker can still be running it.
* bounded retries with backoff live on the tasks (:mod:`worker.tasks`); after
  the last one the study is marked ``dead-letter`` in the database.

Queues: ``realtime`` (a study just arrived) and ``batch`` (reprocessing). A
worker consuming both takes realtime first (``queue_order_strategy=priority``
on Redis; :mod:`worker.broker` on the embedded transport).

No result backend: results go to our own database. Only ids and UIDs travel
through the broker, never pixels or PHI.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from pneumo.settings import Settings, load_settings
from worker.broker import QUEUE_PRIORITY, broker_url_for_celery
from worker.tasks import DELIVER_RESULT, PROCESS_STUDY

REALTIME = "realtime"
BATCH = "batch"
QUEUES = QUEUE_PRIORITY  # (realtime, batch), highest priority first

__all__ = ["BATCH", "DELIVER_RESULT", "PROCESS_STUDY", "QUEUES", "REALTIME", "app", "create_app"]


def celery_config(settings: Settings) -> dict[str, object]:
    """The Celery configuration for ``settings`` (a plain dict, easy to inspect in tests)."""
    limit = settings.task_time_limit_seconds
    transport_options: dict[str, object] = {
        "visibility_timeout": 2 * limit + 60,
        "queue_order_strategy": "priority",
    }
    broker_url = broker_url_for_celery(settings.effective_broker_url)
    if not broker_url.startswith(("redis://", "rediss://")):
        # The embedded transport polls its database; 0.1 s keeps latency low
        # at a negligible cost for one SQLite file on one machine.
        transport_options["polling_interval"] = 0.1
    exchange = Exchange("pneumo", type="direct")
    return {
        "broker_url": broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "task_queues": tuple(Queue(name, exchange, routing_key=name) for name in QUEUES),
        "task_default_queue": REALTIME,
        "task_default_exchange": "pneumo",
        "task_default_routing_key": REALTIME,
        "task_create_missing_queues": False,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
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


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app for ``settings`` (default: from the environment) with our tasks."""
    settings = settings or load_settings()
    app = Celery("pneumo", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.conf.pneumo_settings = settings
    # worker.tasks (imported above) registers its shared tasks on every app.
    app.conf.include = ["worker.tasks"]

    return app


# ``celery -A worker.app worker`` finds this; `pneumo worker` builds its own the same way.
app = create_app()
