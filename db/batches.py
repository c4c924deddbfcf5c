"""Reprocessing batches: which studies an operator asked to run again, and how far they got.

A :class:`Batch` is one request (who, which selector, when, its state); a
:class:`BatchItem` is one selected study. The item holds the *revision* the
request made for its study: it is allocated once (:func:`allocate_items`, the
item and study rows locked, only while the item has none), so a re-published,
redelivered or retried ``process_study(study_id, revision)`` always names that
same revision and never makes a second one. Two batches selecting the same
study make two revisions, in the order the batches were created: an item gets
its revision only when no earlier batch's item for the study is still queued
and the study is not being worked on (``done`` or ``dead-letter``).

Counts are derived from the items (:func:`batch_views`); the batch state is
``queued`` → ``running`` (first revision allocated) → ``done`` (no queued item
left), or ``cancelled``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
    func,
    select,
    update,
)
from sqlalchemy.orm import Mapped, Session, aliased, mapped_column

from db.models import (
    Base,
    Instance,
    ResultStatus,
    Study,
    StudyStatus,
    _enum,
    utcnow,
)
from db.queries import (
    MAX_PAGE_SIZE,
    DateField,
    Finding,
    StudyFilter,
    StudySummary,
    search_studies,
)
from db.repository import PIXELS_PURGED

__all__ = [
    "Batch",
    "BatchItem",
    "BatchItemState",
    "BatchItemView",
    "BatchState",
    "BatchView",
    "CancelReport",
    "ItemAllocation",
    "Selection",
    "Selector",
    "StatusChoice",
    "allocate_items",
    "active_batch_ids",
    "batch_items",
    "batch_views",
    "cancel_batch",
    "create_batch",
    "finish_item",
    "item_cancelled",
    "retry_batch",
    "select_studies",
]


class BatchState(str, enum.Enum):
    """Where a reprocessing batch is."""

    QUEUED = "queued"
    """Created; no revision allocated yet."""
    RUNNING = "running"
    """Items are being published and processed."""
    CANCELLED = "cancelled"
    """An operator stopped it: queued items dropped, running ones finished."""
    DONE = "done"
    """No queued item left."""


class BatchItemState(str, enum.Enum):
    """Where one selected study of a batch is."""

    QUEUED = "queued"
    """Waiting for its revision, or for its revision's outcome."""
    DONE = "done"
    """Its revision was processed (study ``done``)."""
    FAILED = "failed"
    """Its revision was dead-lettered or superseded (see ``error``)."""
    CANCELLED = "cancelled"
    """Dropped by ``pneumo batches cancel`` before it started."""


_SETTLED = (StudyStatus.DONE, StudyStatus.DEAD_LETTER)
"""Study states a batch may start a new revision from (nothing else works on the study)."""


class Batch(Base):
    """One reprocessing request."""

    __tablename__ = "batch"

    id: Mapped[int] = mapped_column(primary_key=True)
    started_by: Mapped[str] = mapped_column(String(128))  # OS user (CLI) or token user (API)
    selector: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    state: Mapped[BatchState] = mapped_column(
        _enum(BatchState, "batch_state"), default=BatchState.QUEUED, index=True
    )
    max_rate: Mapped[float | None] = mapped_column(Float, nullable=True)  # items/s; None = any
    publish_credit_at: Mapped[datetime | None] = mapped_column(nullable=True)
    """Token bucket of ``max_rate``: items may be published for the time since this moment."""
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)


class BatchItem(Base):
    """One study of a batch and the revision the batch made for it."""

    __tablename__ = "batch_item"
    __table_args__ = (
        UniqueConstraint("batch_id", "study_id"),
        Index(None, "study_id", "revision"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batch.id", ondelete="CASCADE"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"))
    revision: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None = not allocated
    previous_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    """The study's status before the revision was allocated (restored by a cancel)."""
    state: Mapped[BatchItemState] = mapped_column(
        _enum(BatchItemState, "batch_item_state"), default=BatchItemState.QUEUED, index=True
    )
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


# --- selection -----------------------------------------------------------------


class StatusChoice(str, enum.Enum):
    """``--status``: which studies a batch selects by their state."""

    FAILED = "failed"
    """The study's last attempt failed (a retry is scheduled)."""
    DEAD_LETTER = "dead-letter"
    """Every attempt failed."""
    SKIPPED = "skipped"
    """Processed, but no image was usable (newest result ``no-usable-image``)."""
    DONE = "done"
    """Processed."""
    ALL = "all"
    """Any state."""


@dataclass(frozen=True)
class Selector:
    """The studies a batch selects; every given criterion must hold (they combine with AND).

    ``model_version`` selects studies whose newest result was made by *another*
    model than this one (``1.0.0`` or ``pneumonet-1.0.0``). An empty selector
    selects nothing unless ``everything`` is set (``--all``).
    """

    study_uids: tuple[str, ...] = ()
    since: date | None = None
    until: date | None = None
    date_field: DateField = DateField.STUDY
    status: StatusChoice | None = None
    finding: Finding | None = None
    flag: str | None = None
    model_version: str | None = None
    everything: bool = False

    def __post_init__(self) -> None:
        if self.since and self.until and self.since > self.until:
            raise ValueError("since: must not be after until")

    @property
    def empty(self) -> bool:
        return not (
            self.study_uids
            or self.since
            or self.until
            or self.status
            or self.finding
            or self.flag
            or self.model_version
            or self.everything
        )

    def as_dict(self) -> dict[str, Any]:
        """The selector as stored on the batch row (JSON)."""
        return {
            "study_uids": list(self.study_uids),
            "since": None if self.since is None else self.since.isoformat(),
            "until": None if self.until is None else self.until.isoformat(),
            "date_field": self.date_field.value,
            "status": None if self.status is None else self.status.value,
            "finding": None if self.finding is None else self.finding.value,
            "flag": self.flag,
            "model_version": self.model_version,
            "all": self.everything,
        }

    def _filter(self) -> StudyFilter:
        status = {
            StatusChoice.FAILED: StudyStatus.FAILED,
            StatusChoice.DEAD_LETTER: StudyStatus.DEAD_LETTER,
            StatusChoice.DONE: StudyStatus.DONE,
            StatusChoice.SKIPPED: StudyStatus.DONE,
        }.get(self.status) if self.status else None  # fmt: skip
        return StudyFilter(
            study_uid=self.study_uids[0] if len(self.study_uids) == 1 else None,
            since=self.since,
            until=self.until,
            date_field=self.date_field,
            finding=self.finding,
            status=status,
            flag=self.flag,
        )

    def _keeps(self, row: StudySummary) -> bool:
        if self.study_uids and row.study_uid not in self.study_uids:
            return False
        if self.status is StatusChoice.SKIPPED and row.result_status is not (
            ResultStatus.NO_USABLE_IMAGE
        ):
            return False
        if self.model_version is not None:
            if row.model is None:  # no result yet: not "made by another model"
                return False
            if self.model_version in (row.model, row.model.rsplit("-", 1)[-1]):
                return False
        return row.revision > 0  # never dispatched: the realtime path will run it


@dataclass(frozen=True)
class Selection:
    """What a selector matched: study ids (newest first) and those left out, with why."""

    study_ids: tuple[int, ...]
    study_uids: tuple[str, ...]
    purged: tuple[str, ...] = ()
    """Studies whose spooled pixels retention deleted: a rerun would lose their result."""
    rows: tuple[StudySummary, ...] = field(default=(), repr=False)
    """The matching :class:`db.queries.StudySummary` rows, in the same order."""


def select_studies(
    session: Session, selector: Selector, *, include_purged: bool = False
) -> Selection:
    """The studies ``selector`` matches, through :func:`db.queries.search_studies`.

    Studies whose spooled pixels were purged are left out (and listed in
    ``purged``) unless ``include_purged``: the caller can fetch them back from
    the PACS (``PNEUMO_PACS``; the worker retrieves missing files before reading).

    Raises:
        ValueError: when the selector is empty (use ``everything`` for all studies).
    """
    if selector.empty:
        raise ValueError("selector: give at least one criterion, or --all")
    rows: list[StudySummary] = []
    cursor: str | None = None
    while True:
        page = search_studies(
            session, selector._filter(), limit=MAX_PAGE_SIZE, cursor=cursor, with_deliveries=False
        )
        rows += [row for row in page.rows if selector._keeps(row)]
        cursor = page.next_cursor
        if cursor is None:
            break
    uids = [row.study_uid for row in rows]
    ids: dict[str, int] = {}
    purged: set[str] = set()
    for start in range(0, len(uids), 500):
        chunk = uids[start : start + 500]
        ids.update(
            (str(uid), int(i))
            for i, uid in session.execute(
                select(Study.id, Study.study_uid).where(Study.study_uid.in_(chunk))
            ).all()
        )
        purged.update(
            str(uid)
            for uid in session.execute(
                select(Study.study_uid)
                .join(Instance, Instance.study_id == Study.id)
                .where(Study.study_uid.in_(chunk), Instance.skip_reason == PIXELS_PURGED)
                .distinct()
            ).scalars()
        )
    if include_purged:
        purged = set()
    kept = [row for row in rows if row.study_uid not in purged]
    return Selection(
        study_ids=tuple(ids[row.study_uid] for row in kept),
        study_uids=tuple(row.study_uid for row in kept),
        purged=tuple(sorted(purged)),
        rows=tuple(kept),
    )


# --- batches -------------------------------------------------------------------


def create_batch(
    session: Session,
    *,
    started_by: str,
    selector: dict[str, Any],
    study_ids: Sequence[int],
    max_rate: float | None = None,
) -> int:
    """Record a batch and one queued item per study (oldest study first); returns its id.

    Raises:
        ValueError: when ``max_rate`` is not positive.
    """
    if max_rate is not None and not max_rate > 0:
        raise ValueError("max_rate: must be > 0 items per second")
    now = utcnow()
    batch = Batch(
        started_by=started_by[:128],
        selector=selector,
        created_at=now,
        state=BatchState.DONE if not study_ids else BatchState.QUEUED,
        max_rate=max_rate,
        publish_credit_at=now,
        finished_at=now if not study_ids else None,
    )
    session.add(batch)
    session.flush()
    session.add_all(
        BatchItem(batch_id=batch.id, study_id=study_id, state=BatchItemState.QUEUED)
        for study_id in sorted(set(study_ids))
    )
    session.flush()
    return batch.id


def active_batch_ids(session: Session) -> list[int]:
    """Batches with items still to publish (queued or running), oldest first."""
    return [
        int(i)
        for i in session.execute(
            select(Batch.id)
            .where(Batch.state.in_([BatchState.QUEUED, BatchState.RUNNING]))
            .order_by(Batch.id)
        ).scalars()
    ]


@dataclass(frozen=True)
class ItemAllocation:
    """A revision allocated for one batch item: publish ``process_study(study_id, revision)``."""

    item_id: int
    study_id: int
    revision: int


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _allowance(batch: Batch, now: datetime, burst: int) -> int:
    if batch.max_rate is None:
        return burst
    credit_at = _aware(batch.publish_credit_at or batch.created_at)
    cap = max(1, math.ceil(batch.max_rate * 10))  # at most 10 s of credit saved up
    return max(0, min(cap, burst, int((now - credit_at).total_seconds() * batch.max_rate)))


def _take_credit(batch: Batch, now: datetime, used: int) -> None:
    if batch.max_rate is None or used == 0:
        return
    rate = batch.max_rate
    credit_at = _aware(batch.publish_credit_at or batch.created_at)
    credit_at = max(credit_at, now - timedelta(seconds=math.ceil(rate * 10) / rate))
    batch.publish_credit_at = credit_at + timedelta(seconds=used / rate)


def _blocked(session: Session, item: BatchItem) -> bool:
    """True when an earlier batch's item for the study is queued, or one of ours is in flight."""
    other = aliased(BatchItem)
    found = session.execute(
        select(other.id)
        .where(
            other.study_id == item.study_id,
            other.id != item.id,
            other.state == BatchItemState.QUEUED,
            (other.batch_id < item.batch_id) | other.revision.is_not(None),
        )
        .limit(1)
    ).first()
    return found is not None


def allocate_items(
    session: Session, batch_id: int, *, now: datetime | None = None, burst: int = 200
) -> list[ItemAllocation]:
    """Allocate the next revisions of a batch (at most ``max_rate`` allows); the caller
    commits, *then* publishes each.

    An item gets a revision once: the batch row is locked, the item must have
    none, and its study is locked and must be settled (``done`` or
    ``dead-letter``) with no earlier item for it pending. The study becomes
    ``queued`` at the new revision, so a lost wake-up is re-published by the
    reconciler. Items whose study is busy wait for a later call.
    """
    now = now or datetime.now(UTC)
    batch = session.get(Batch, batch_id, with_for_update=True)
    if batch is None or batch.state not in (BatchState.QUEUED, BatchState.RUNNING):
        return []
    allowance = _allowance(batch, now, burst)
    pending = (
        session.execute(
            select(BatchItem)
            .where(
                BatchItem.batch_id == batch_id,
                BatchItem.state == BatchItemState.QUEUED,
                BatchItem.revision.is_(None),
            )
            .order_by(BatchItem.id)
        )
        .scalars()
        .all()
    )
    allocated: list[ItemAllocation] = []
    for item in pending:
        if len(allocated) >= allowance:
            break
        if _blocked(session, item):
            continue
        study = session.get(Study, item.study_id, with_for_update=True)
        if study is None or study.status not in _SETTLED:
            continue
        item.previous_status = study.status.value
        study.revision += 1
        study.status = StudyStatus.QUEUED
        study.queued_at = utcnow()
        study.completed_at = None
        item.revision = study.revision
        allocated.append(ItemAllocation(item.id, study.id, study.revision))
    _take_credit(batch, now, len(allocated))
    if allocated and batch.state is BatchState.QUEUED:
        batch.state = BatchState.RUNNING
    session.flush()
    _settle(session, batch_id)
    return allocated


def _settle(session: Session, batch_id: int) -> None:
    """Mark a queued or running batch done when none of its items is queued any more."""
    queued = (
        select(BatchItem.id)
        .where(BatchItem.batch_id == batch_id, BatchItem.state == BatchItemState.QUEUED)
        .exists()
    )
    session.execute(
        update(Batch)
        .where(
            Batch.id == batch_id,
            Batch.state.in_([BatchState.QUEUED, BatchState.RUNNING]),
            ~queued,
        )
        .values(state=BatchState.DONE, finished_at=utcnow())
    )


def finish_item(
    session: Session,
    study_id: int,
    revision: int,
    state: BatchItemState,
    error: str | None = None,
) -> int | None:
    """Record the outcome of the batch item that made ``revision`` of the study, if any.

    Returns the batch id (None when no queued batch item made that revision:
    realtime work). Called in the transaction that records the study's outcome.
    """
    item = session.execute(
        select(BatchItem).where(
            BatchItem.study_id == study_id,
            BatchItem.revision == revision,
            BatchItem.state == BatchItemState.QUEUED,
        )
    ).scalar_one_or_none()
    if item is None:
        return None
    item.state = state
    item.error = None if error is None else error[:1000]
    session.flush()
    _settle(session, item.batch_id)
    return item.batch_id


def item_cancelled(session: Session, study_id: int, revision: int) -> bool:
    """True when the batch item that made ``revision`` of the study was cancelled."""
    found = session.execute(
        select(BatchItem.id)
        .where(
            BatchItem.study_id == study_id,
            BatchItem.revision == revision,
            BatchItem.state == BatchItemState.CANCELLED,
        )
        .limit(1)
    ).first()
    return found is not None


@dataclass(frozen=True)
class CancelReport:
    """What ``cancel`` did: items dropped, and items left to finish (already started)."""

    found: bool
    dropped: int = 0
    running: int = 0


def cancel_batch(session: Session, batch_id: int) -> CancelReport:
    """Cancel a batch: queued items are dropped, items already started finish.

    An item whose revision was allocated but not started (study still
    ``queued`` at that revision) is dropped and the study gets its previous
    status back; its wake-up, if delivered later, finds the item cancelled
    (:func:`item_cancelled`) and does nothing. Each study row is locked, so a
    task starting at the same moment either started first (the item runs) or
    sees the cancel.
    """
    batch = session.get(Batch, batch_id, with_for_update=True)
    if batch is None:
        return CancelReport(found=False)
    items = (
        session.execute(
            select(BatchItem)
            .where(BatchItem.batch_id == batch_id, BatchItem.state == BatchItemState.QUEUED)
            .order_by(BatchItem.id)
        )
        .scalars()
        .all()
    )
    dropped = running = 0
    for item in items:
        if item.revision is not None:
            study = session.get(Study, item.study_id, with_for_update=True)
            started = study is not None and not (
                study.revision == item.revision and study.status is StudyStatus.QUEUED
            )
            if started:
                running += 1
                continue
            if study is not None:
                study.status = StudyStatus(item.previous_status or StudyStatus.DONE.value)
        item.state = BatchItemState.CANCELLED
        dropped += 1
    if batch.state in (BatchState.QUEUED, BatchState.RUNNING):
        batch.state = BatchState.CANCELLED
        batch.finished_at = utcnow()
    session.flush()
    return CancelReport(found=True, dropped=dropped, running=running)


def retry_batch(session: Session, batch_id: int) -> int | None:
    """Queue the batch's failed items again (each will get a new revision); how many.

    None when the batch is unknown. A done or cancelled batch runs again.
    """
    batch = session.get(Batch, batch_id, with_for_update=True)
    if batch is None:
        return None
    result: Any = session.execute(
        update(BatchItem)
        .where(BatchItem.batch_id == batch_id, BatchItem.state == BatchItemState.FAILED)
        .values(
            state=BatchItemState.QUEUED,
            revision=None,
            previous_status=None,
            error=None,
            updated_at=utcnow(),
        )
    )
    count = int(result.rowcount or 0)
    if count:
        batch.state = BatchState.RUNNING
        batch.finished_at = None
        batch.publish_credit_at = utcnow()
    session.flush()
    return count


# --- views ---------------------------------------------------------------------


@dataclass(frozen=True)
class BatchView:
    """A batch as ``pneumo batches`` and the API show it; counts derived from its items."""

    batch_id: int
    started_by: str
    selector: dict[str, Any]
    created_at: datetime
    finished_at: datetime | None
    state: BatchState
    max_rate: float | None
    counts: dict[str, int]
    """Items by state (``queued``, ``done``, ``failed``, ``cancelled``), each key present."""

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.batch_id,
            "started_by": self.started_by,
            "selector": self.selector,
            "created_at": self.created_at.isoformat(),
            "finished_at": None if self.finished_at is None else self.finished_at.isoformat(),
            "state": self.state.value,
            "max_rate": self.max_rate,
            "counts": dict(self.counts),
            "total": self.total,
        }


def batch_views(
    session: Session, batch_ids: Iterable[int] | None = None, *, limit: int = 50
) -> list[BatchView]:
    """Batches (newest first), or the given ones, with their item counts."""
    stmt = select(Batch).order_by(Batch.id.desc())
    if batch_ids is not None:
        stmt = stmt.where(Batch.id.in_(list(batch_ids)))
    else:
        stmt = stmt.limit(limit)
    batches = list(session.execute(stmt).scalars())
    counts: dict[int, dict[str, int]] = {
        b.id: {s.value: 0 for s in BatchItemState} for b in batches
    }
    if batches:
        rows = session.execute(
            select(BatchItem.batch_id, BatchItem.state, func.count())
            .where(BatchItem.batch_id.in_(list(counts)))
            .group_by(BatchItem.batch_id, BatchItem.state)
        ).all()
        for batch_id, state, count in rows:
            counts[int(batch_id)][state.value] = int(count)
    return [
        BatchView(b.id, b.started_by, dict(b.selector or {}), b.created_at, b.finished_at,
                  b.state, b.max_rate, counts[b.id])
        for b in batches
    ]  # fmt: skip


@dataclass(frozen=True)
class BatchItemView:
    """One item of ``pneumo batches show``."""

    study_uid: str
    revision: int | None
    state: BatchItemState
    error: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "revision": self.revision,
            "state": self.state.value,
            "error": self.error,
        }


def batch_items(
    session: Session, batch_id: int, *, states: Sequence[BatchItemState] = (), limit: int = 1000
) -> list[BatchItemView]:
    """The batch's items in the order they are published, optionally only in ``states``."""
    stmt = (
        select(Study.study_uid, BatchItem.revision, BatchItem.state, BatchItem.error)
        .join(Study, and_(Study.id == BatchItem.study_id))
        .where(BatchItem.batch_id == batch_id)
        .order_by(BatchItem.id)
        .limit(limit)
    )
    if states:
        stmt = stmt.where(BatchItem.state.in_(list(states)))
    return [BatchItemView(str(u), r, s, e) for u, r, s, e in session.execute(stmt).all()]
