"""The Celery app of a ``pneumo`` process, built from the settings: the one place it is made.

``pneumo worker`` runs it, and so does Celery's own command line::

    celery -A pneumo.celery_app worker --queues realtime,batch --concurrency 1

Importing this module reads nothing; the first access to :data:`app` loads
the settings from the environment (and ``PNEUMO_CONFIG``), starts the embedded
broker when no ``PNEUMO_BROKER_URL`` is set, and builds the app with
:func:`worker.app.create_app`. Commands that already hold settings call
:func:`build_app` instead.
"""

from __future__ import annotations

from celery import Celery

from pneumo.settings import Settings, load_settings
from worker import embedded_broker
from worker.app import create_app
from worker.config import WorkerPool

__all__ = ["app", "build_app", "start_embedded_broker"]

app: Celery
"""The app ``celery -A pneumo.celery_app`` runs; built on first access (:func:`__getattr__`)."""

_app: Celery | None = None


def start_embedded_broker(settings: Settings) -> int | None:
    """Start the private ``redis-server`` when the settings use it and none runs.

    Returns its pid (None with an external broker). It is left running for the
    other processes of the stack; ``pneumo up`` stops it at exit.

    Raises:
        worker.embedded_broker.EmbeddedBrokerError: when it cannot be started.
    """
    if not settings.uses_embedded_broker:
        return None
    pid, _ = embedded_broker.ensure_running(settings.data_dir)
    return pid


def build_app(settings: Settings) -> Celery:
    """The Celery app for ``settings`` (the broker is not contacted, nor started).

    Its ``worker_pool`` and ``worker_concurrency`` are the settings' pool
    (``PNEUMO_WORKER_POOL``) and studies in flight, as ``pneumo worker`` uses
    them, so ``celery -A pneumo.celery_app worker`` without ``-P``/``-c`` runs
    the same pool; their flags still override.
    """
    app = create_app(settings.worker_config())
    app.conf.worker_pool = settings.worker_pool.value
    app.conf.worker_concurrency = (
        settings.worker_threads if settings.worker_pool is WorkerPool.THREADS else 1
    )
    return app


def __getattr__(name: str) -> Celery:
    """``app``: built on first access, for ``celery -A pneumo.celery_app``."""
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        settings = load_settings()
        start_embedded_broker(settings)
        _app = build_app(settings)
    return _app
