"""Reads behind the Prometheus metrics and ``pneumo status``: counts and timings, never PHI.

Every function returns aggregates keyed by codes the product defines (statuses,
stage names, destinations as ``AE@host:port``, model names, worker node
names); none returns a patient value or a UID.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import (
    Delivery,
    DeliveryStatus,
    ModelVersion,
    Result,
    Study,
    StudyStatus,
    WorkerHeartbeat,
    utcnow,
)

__all__ = [
    "DeliveryCount",
    "ModelInfo",
    "WorkerCounts",
    "delivery_counts",
    "models_in_use",
    "processing_seconds",
    "stage_seconds",
    "study_counts",
    "worker_counts",
]


def study_counts(session: Session) -> dict[str, int]:
    """Studies per status, every :class:`~db.models.StudyStatus` present (0 when none)."""
    counts = {status.value: 0 for status in StudyStatus}
    for status, count in session.execute(
        select(Study.status, func.count()).group_by(Study.status)
    ).all():
        counts[StudyStatus(status).value] = int(count)
    return counts


@dataclass(frozen=True)
class DeliveryCount:
    """Delivery rows to one destination: how many in each status, and failed attempts.

    ``failed_attempts`` is the number of attempts that did not end in ``sent``
    (every attempt of a pending or failed row, all but the last of a sent one).
    """

    destination: str
    by_status: dict[str, int]
    failed_attempts: int


def delivery_counts(session: Session) -> list[DeliveryCount]:
    """Per destination (sorted): deliveries by status and failed send attempts."""
    stmt = select(
        Delivery.destination,
        Delivery.status,
        func.count(),
        func.coalesce(func.sum(Delivery.attempts), 0),
    ).group_by(Delivery.destination, Delivery.status)
    by_destination: dict[str, tuple[dict[str, int], int]] = {}
    for destination, status, count, attempts in session.execute(stmt).all():
        statuses, failed = by_destination.setdefault(
            str(destination), ({s.value: 0 for s in DeliveryStatus}, 0)
        )
        status = DeliveryStatus(status)
        statuses[status.value] = int(count)
        # A sent row's last attempt succeeded; every other attempt failed.
        failed += int(attempts) - (int(count) if status is DeliveryStatus.SENT else 0)
        by_destination[str(destination)] = (statuses, failed)
    return [
        DeliveryCount(destination, statuses, max(0, failed))
        for destination, (statuses, failed) in sorted(by_destination.items())
    ]


def stage_seconds(session: Session, *, since: datetime) -> dict[str, list[float]]:
    """Seconds per pipeline stage (``result.timings`` keys) of the results created since ``since``.

    Delivery timings (``send:<destination>``) keep their key; callers split it.
    """
    samples: dict[str, list[float]] = {}
    rows = session.execute(select(Result.timings).where(Result.created_at >= since)).scalars()
    for timings in rows:
        for stage, seconds in (timings or {}).items():
            if isinstance(seconds, int | float) and not isinstance(seconds, bool):
                samples.setdefault(str(stage), []).append(float(seconds))
    return samples


def processing_seconds(session: Session, *, since: datetime) -> list[float]:
    """Seconds from a study's queueing to its result, for the results created since ``since``."""
    rows = session.execute(
        select(Study.queued_at, Result.created_at)
        .join(Study, Result.study_id == Study.id)
        .where(Result.created_at >= since, Study.queued_at.is_not(None))
    ).all()
    return [
        max(0.0, (_aware(created) - _aware(queued)).total_seconds())
        for queued, created in rows
        if queued is not None
    ]


@dataclass(frozen=True)
class ModelInfo:
    """A model version that produced results, with how many, and whether it is the newest."""

    name: str
    version: str
    sha256: str
    results: int
    active: bool  # produced the newest result


def models_in_use(session: Session) -> list[ModelInfo]:
    """Every model version with its result count; ``active`` marks the newest result's model."""
    newest = session.execute(
        select(Result.model_version_id)
        .order_by(Result.created_at.desc(), Result.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    stmt = (
        select(ModelVersion, func.count(Result.id))
        .outerjoin(Result, Result.model_version_id == ModelVersion.id)
        .group_by(ModelVersion.id)
        .order_by(ModelVersion.id)
    )
    return [
        ModelInfo(m.name, m.version, m.sha256, int(count), m.id == newest)
        for m, count in session.execute(stmt).all()
    ]


@dataclass(frozen=True)
class WorkerCounts:
    """Workers whose heartbeat is fresh (live) or stale, and the tasks the live ones run."""

    live: int
    stale: int
    running_tasks: int
    live_workers: tuple[str, ...]


def worker_counts(session: Session, *, stale_after: timedelta) -> WorkerCounts:
    """Count ``worker_heartbeat`` rows by freshness (``stale_after`` as in the reconciler)."""
    cutoff = utcnow() - stale_after
    live: list[str] = []
    stale = running = 0
    rows: Sequence[tuple[str, datetime, list[str]]] = [
        (str(w), at, list(tasks or ()))
        for w, at, tasks in session.execute(
            select(WorkerHeartbeat.worker, WorkerHeartbeat.beat_at, WorkerHeartbeat.active_tasks)
        ).all()
    ]
    for worker, beat_at, tasks in rows:
        if _aware(beat_at) >= cutoff:
            live.append(worker)
            running += len(tasks)
        else:
            stale += 1
    return WorkerCounts(len(live), stale, running, tuple(sorted(live)))


def _aware(moment: datetime) -> datetime:
    # SQLite returns naive datetimes for values stored in UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=utcnow().tzinfo)
