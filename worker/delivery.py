"""Stage 8, deliver: send a stored result (SR + SC files) to one destination, record the outcome.

Separate from inference on purpose: a failed send is retried by its own task
(:func:`worker.tasks.deliver_result`) from the files on disk; the model never
runs again. Reads and writes go through :mod:`db.repository`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from db import repository as repo
from db.engine import session_scope
from db.models import DeliveryStatus
from dicom_io.config import Destination
from dicom_io.send import send_files
from worker.config import WorkerConfig

__all__ = ["DeliveryOutcome", "deliver", "result_files"]

log = logging.getLogger(__name__)

NO_FILES_ERROR = "no result files on disk"


@dataclass(frozen=True)
class DeliveryOutcome:
    """One :func:`deliver` call: its delivery row, and whether the destination has the result."""

    delivery_id: int
    destination: str
    ok: bool
    already_sent: bool
    """The row was already ``sent`` (a redelivered task): nothing was sent again."""
    error: str | None
    seconds: float


def result_files(config: WorkerConfig, result_id: int) -> list[Path]:
    """The SR and SC files of a result, SR first; only files that exist.

    Raises:
        LookupError: no result row has ``result_id``.
    """
    with session_scope(config.database_url) as session:
        paths = repo.result_file_paths(session, result_id)
    if paths is None:
        raise LookupError(f"result id {result_id} not in the database")
    return [Path(p) for p in paths if Path(p).is_file()]


def _send(config: WorkerConfig, files: list[Path], dest: Destination, retries: int) -> str | None:
    """C-STORE ``files`` to ``dest``; the error text, or None when every file was stored."""
    if not files:
        return NO_FILES_ERROR
    sent = send_files(
        files,
        dest,
        calling_ae=config.ae_title,
        retries=retries,
        backoff_seconds=config.send_backoff_seconds,
        tls=config.tls,
    )
    if sent.ok:
        return None
    return "; ".join(sorted({reason for _, reason in sent.failed}))[:500]


def deliver(
    config: WorkerConfig, result_id: int, destination: Destination | str, *, retries: int = 0
) -> DeliveryOutcome:
    """Send the result's files to ``destination`` once (plus ``retries`` quick retries).

    Idempotent per (result, destination): once the delivery row is ``sent``,
    a repeat returns ``already_sent`` without sending. A failed send is
    recorded on the row and returned (``ok`` False), not raised.

    Raises:
        ValueError: ``destination`` is not ``AE@host:port``.
        LookupError: no result row has ``result_id``.
        sqlalchemy.exc.SQLAlchemyError: the database failed.
    """
    dest = destination if isinstance(destination, Destination) else Destination.parse(destination)
    with session_scope(config.database_url) as session:
        delivery_id = repo.ensure_delivery(session, result_id, str(dest))
        status = repo.delivery_status(session, delivery_id)
    if status is DeliveryStatus.SENT:  # a redelivered task: nothing to do
        return DeliveryOutcome(delivery_id, str(dest), True, True, None, 0.0)

    files = result_files(config, result_id)
    start = time.perf_counter()
    error = _send(config, files, dest, retries)
    seconds = time.perf_counter() - start
    ok = error is None
    with session_scope(config.database_url) as session:
        repo.record_delivery_attempt(session, delivery_id, ok=ok, error=error)
        repo.update_timings(session, result_id, {f"send:{dest}": seconds})
    if not ok:
        log.warning("result %d to %s failed: %s", result_id, dest, error)
    return DeliveryOutcome(delivery_id, str(dest), ok, False, error, seconds)
