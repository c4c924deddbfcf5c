"""The Celery pipeline from a received study to a stored, delivered result.

Modules: :mod:`worker.app` (the app factory), :mod:`worker.tasks` (the tasks),
:mod:`worker.intake` (the listener's callbacks), :mod:`worker.pipeline` and its
stages, :mod:`worker.delivery`, :mod:`worker.heartbeat` and :mod:`worker.reconciler`
(worker liveness; stale work re-published), :mod:`worker.embedded_broker` (the
private ``redis-server`` of the embedded default). Configuration is one frozen
:class:`WorkerConfig`; ``worker`` never reads the environment nor imports ``pneumo``.
"""

from worker.config import WorkerConfig
from worker.queues import QUEUE_PRIORITY, QueueName

__all__ = ["QUEUE_PRIORITY", "QueueName", "WorkerConfig"]
