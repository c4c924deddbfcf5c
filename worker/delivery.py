"""Sending a stored result (SR + SC files) to one destination and recording the outcome.

Separate from inference on purpose: a failed send is retried by its own task
(:func:`worker.tasks.deliver_result`) from the files on disk; the model never runs again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from db import repository as repo
from db.engine import session_scope
from db.models import Delivery, DeliveryStatus, ImageResult, Result
from dicom_io.config import Destination
from pneumo.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliveryOutcome:
    delivery_id: int
    destination: str
    ok: bool
    already_sent: bool
    error: str | None
    seconds: float


def result_files(settings: Settings, result_id: int) -> list[Path]:
    """The SR and SC files of a result, SR first; only files that exist."""
    with session_scope(settings.effective_database_url) as session:
        result = session.get(Result, result_id)
        if result is None:
            raise LookupError(f"result id {result_id} not in the database")
        paths = [result.sr_path] if result.sr_path else []
        paths += session.execute(
            select(ImageResult.sc_path)
            .where(ImageResult.result_id == result_id, ImageResult.sc_path.is_not(None))
            .order_by(ImageResult.id)
        ).scalars().all()
    return [Path(p) for p in paths if p and Path(p).is_file()]


def deliver(
    settings: Settings, result_id: int, destination: Destination | str, *, retries: int = 0
) -> DeliveryOutcome:
    """Send the result's files to ``destination`` once (plus ``retries`` quick retries)."""
    import time

    from dicom_io.send import send_files

    dest = destination if isinstance(destination, Destination) else Destination.parse(destination)
    url = settings.effective_database_url
    with session_scope(url) as session:
        delivery_id = repo.ensure_delivery(session, result_id, str(dest))
        status = session.get(Delivery, delivery_id).status
    if status is DeliveryStatus.SENT:  # a redelivered task: nothing to do
        return DeliveryOutcome(delivery_id, str(dest), True, True, None, 0.0)

    files = result_files(settings, result_id)
    start = time.perf_counter()
    if not files:
        ok, error = False, "no result files on disk"
    else:
        sent = send_files(
            files,
            dest,
            calling_ae=settings.ae_title,
            retries=retries,
            backoff_seconds=settings.send_backoff_seconds,
            tls=settings.tls_config(),
        )
        ok = sent.ok
        error = None if ok else "; ".join(sorted({reason for _, reason in sent.failed}))[:500]
    seconds = time.perf_counter() - start
    with session_scope(url) as session:
        repo.record_delivery_attempt(session, delivery_id, ok=ok, error=error)
        repo.update_timings(session, result_id, {f"send:{dest}": seconds})
    if not ok:
        log.warning("result %d to %s failed: %s", result_id, dest, error)
    return DeliveryOutcome(delivery_id, str(dest), ok, False, error, seconds)
