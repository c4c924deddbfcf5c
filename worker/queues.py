"""The Celery queues and their priority: the one place their names are spelled."""

from __future__ import annotations

from enum import Enum

__all__ = ["QUEUE_PRIORITY", "QueueName"]


class QueueName(str, Enum):
    """A queue a study's task can wait in."""

    REALTIME = "realtime"
    """A study the PACS just sent: radiologists are waiting on it."""
    BATCH = "batch"
    """Reprocessing an operator asked for: runs when no realtime work waits."""

    def __str__(self) -> str:
        return self.value


QUEUE_PRIORITY: tuple[QueueName, ...] = (QueueName.REALTIME, QueueName.BATCH)
"""Highest priority first: a worker consuming both takes realtime work first."""
