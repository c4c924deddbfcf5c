"""The embedded (server-less) Celery broker: kombu's SQLAlchemy transport, made
safe for acks_late and able to serve queues in priority order.

kombu's stock ``sqla`` transport (a) polls queues round-robin, so ``realtime``
work would wait behind ``batch`` work, and (b) marks a delivered message
invisible and never deletes it: if the consuming process is killed before the
ack, the message is lost for good. This subclass

* polls queues in a fixed priority order (``realtime`` before ``batch``), the
  same behaviour Redis gives with ``queue_order_strategy="priority"``;
* deletes a message only when it is acknowledged;
* makes a delivered-but-unacknowledged message visible again after
  ``visibility_timeout`` seconds (what Redis does with its unacked index), and at
  once when the consumer restores it on a clean shutdown or a reject.

It is registered as the kombu transport alias ``pneumo_sqla``;
:func:`broker_url_for_celery` rewrites ``sqla+...`` URLs to it.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as kombu_sqla
from kombu.utils.scheduling import FairCycle
from queue import Empty

ALIAS = "pneumo_sqla"
QUEUE_PRIORITY: tuple[str, ...] = ("realtime", "batch")
DEFAULT_VISIBILITY_TIMEOUT = 3600.0
_SWEEP_EVERY_SECONDS = 5.0
_NOT_ENGINE_OPTIONS = (
    "queue_tablename", "message_tablename", "callback", "errback", "max_retries",
    "interval_start", "interval_step", "interval_max", "retry_errors",
    "visibility_timeout", "polling_interval", "queue_order_strategy", "body_encoding",
    "deadletter_queue", "confirm_publish",
)


def _rank(queue: str) -> int:
    try:
        return QUEUE_PRIORITY.index(queue)
    except ValueError:
        return len(QUEUE_PRIORITY)


class PriorityCycle(FairCycle):
    """Always try the queues in priority order, starting again from the top."""

    def get(self, callback: Any, **kwargs: Any) -> Any:
        for resource in sorted(self.resources, key=_rank):
            try:
                return self.fun(resource, callback, **kwargs)
            except self.predicate:
                continue
        raise self.predicate()


def _naive_utc(moment: datetime) -> datetime:
    # kombu's column is a naive DateTime holding UTC.
    return moment.astimezone(timezone.utc).replace(tzinfo=None)


class Channel(kombu_sqla.Channel):
    from_transport_options = kombu_sqla.Channel.from_transport_options + ("visibility_timeout",)
    visibility_timeout = DEFAULT_VISIBILITY_TIMEOUT

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self._rows: dict[str, int] = {}  # delivery tag -> message row id
        self._rows_lock = threading.Lock()
        self._last_sweep = 0.0

    def _engine_from_config(self) -> Any:
        # kombu hands every transport option to create_engine; keep only engine arguments.
        from sqlalchemy import create_engine, event

        options = dict(self.connection.client.transport_options)
        for name in _NOT_ENGINE_OPTIONS:
            options.pop(name, None)
        url = self.connection.client.hostname
        if url.startswith("sqlite"):
            options.setdefault("connect_args", {"timeout": 30})
            engine = create_engine(url, **options)

            def pragmas(dbapi_connection: Any, _record: Any) -> None:
                # WAL: producers and consumers in other processes do not block each other.
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA busy_timeout=30000")
                cursor.close()

            event.listen(engine, "connect", pragmas)
            return engine
        return create_engine(url, **options)

    def _get_or_create(self, queue: str) -> Any:
        # kombu's version only guards against threads of one process; the
        # listener and the worker are separate processes that may both create
        # the queue row at start-up. The loser of that race reads the winner's row.
        from sqlalchemy.exc import IntegrityError

        for _ in range(5):
            try:
                return super()._get_or_create(queue)
            except IntegrityError:
                self.session.rollback()
        return super()._get_or_create(queue)

    def _reset_cycle(self) -> None:
        self._cycle = PriorityCycle(self._get_and_deliver, self._active_queues, Empty)

    def _sweep(self) -> None:
        """Make messages whose consumer vanished (no ack within the timeout) visible again."""
        now = time.monotonic()
        if now - self._last_sweep < _SWEEP_EVERY_SECONDS:
            return
        self._last_sweep = now
        cutoff = _naive_utc(datetime.now(timezone.utc) - timedelta(seconds=self.visibility_timeout))
        msg = self.message_cls
        self.session.query(msg).filter(msg.visible == False).filter(  # noqa: E712
            msg.sent_at < cutoff
        ).update({msg.visible: True}, synchronize_session=False)
        self.session.commit()

    def _get(self, queue: str) -> Any:
        self._sweep()
        obj = self._get_or_create(queue)
        if self.session.bind.name == "sqlite":
            self.session.execute(kombu_sqla.text("BEGIN IMMEDIATE TRANSACTION"))
        try:
            msg = (
                self.session.query(self.message_cls)
                .with_for_update(skip_locked=self.session.bind.name == "postgresql")
                .filter(self.message_cls.queue_id == obj.id)
                .filter(self.message_cls.visible != False)  # noqa: E712
                .order_by(self.message_cls.sent_at)
                .order_by(self.message_cls.id)
                .limit(1)
                .first()
            )
            if msg is None:
                raise Empty()
            msg.visible = False
            # From now on sent_at is "delivered at": the sweep measures the timeout from it.
            msg.sent_at = _naive_utc(datetime.now(timezone.utc))
            payload = kombu_sqla.loads(kombu_sqla.bytes_to_str(msg.payload))
            tag = payload.get("properties", {}).get("delivery_tag")
            if tag is not None:
                with self._rows_lock:
                    self._rows[tag] = msg.id
            return payload
        finally:
            self.session.commit()

    def _forget(self, delivery_tag: Any) -> int | None:
        with self._rows_lock:
            return self._rows.pop(delivery_tag, None)

    def _own_session(self) -> Any:
        # Acks and rejects come from Celery's pool result thread while the
        # consumer thread polls with self.session: a Session is not thread-safe,
        # so these use a short-lived session of their own.
        _, session_maker = self._open()
        return session_maker()

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        super().basic_ack(delivery_tag, multiple=multiple)
        row = self._forget(delivery_tag)
        if row is not None:
            with self._own_session() as session:
                session.query(self.message_cls).filter(self.message_cls.id == row).delete(
                    synchronize_session=False
                )
                session.commit()

    def _restore(self, message: Any) -> None:
        row = self._forget(message.delivery_tag)
        if row is None:
            super()._restore(message)
            return
        # Make the original row visible again instead of adding a copy.
        with self._own_session() as session:
            session.query(self.message_cls).filter(self.message_cls.id == row).update(
                {self.message_cls.visible: True}, synchronize_session=False
            )
            session.commit()


class Transport(kombu_sqla.Transport):
    Channel = Channel


def register() -> None:
    """Make ``pneumo_sqla+<sqlalchemy url>`` a known kombu transport (idempotent)."""
    TRANSPORT_ALIASES.setdefault(ALIAS, f"{__name__}:Transport")


def broker_url_for_celery(url: str) -> str:
    """Route kombu's ``sqla+`` URLs through this module's safer transport."""
    register()
    if url.startswith("sqla+"):
        return f"{ALIAS}+{url[len('sqla+'):]}"
    return url
