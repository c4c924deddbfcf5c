"""The embedded broker keeps unacknowledged messages: a consumer that dies
before acking loses nothing, an acked message is gone, queues are served in
priority order."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from kombu import Connection, Exchange, Queue
from sqlalchemy import create_engine, text

from worker.broker import broker_url_for_celery

EXCHANGE = Exchange("t", type="direct")


def _conn(url: str, visibility: float = 1.0) -> Connection:
    return Connection(
        broker_url_for_celery(url),
        transport_options={"visibility_timeout": visibility, "polling_interval": 0.05},
    )


def _rows(db: Path) -> int:
    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as c:
        n = c.execute(text("SELECT count(*) FROM kombu_message")).scalar_one()
    engine.dispose()
    return int(n)


def test_message_of_killed_consumer_comes_back_and_ack_deletes(tmp_path: Path) -> None:
    db = tmp_path / "broker.db"
    url = f"sqla+sqlite:///{db}"
    queue = Queue("work", EXCHANGE, routing_key="work")
    with _conn(url) as conn:
        conn.Producer().publish({"n": 1}, exchange=EXCHANGE, routing_key="work", declare=[queue])

    # A consumer takes the message and dies (os._exit: no ack, no clean restore).
    script = textwrap.dedent(f"""
        import os
        from kombu import Connection, Exchange, Queue
        from worker.broker import broker_url_for_celery
        conn = Connection(broker_url_for_celery({url!r}), transport_options={{"visibility_timeout": 1.0}})
        message = Queue("work", Exchange("t", type="direct"), routing_key="work")(conn.default_channel).get()
        assert message is not None and message.payload == {{"n": 1}}
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)

    with _conn(url) as conn:
        bound = queue(conn.default_channel)
        time.sleep(1.5)  # past the visibility timeout
        message = bound.get()
        assert message is not None and message.payload == {"n": 1}
        message.ack()
    assert _rows(db) == 0  # acked messages do not pile up


def test_clean_reject_requeues_without_copy(tmp_path: Path) -> None:
    db = tmp_path / "broker.db"
    url = f"sqla+sqlite:///{db}"
    queue = Queue("work", EXCHANGE, routing_key="work")
    with _conn(url, visibility=3600) as conn:
        conn.Producer().publish({"n": 2}, exchange=EXCHANGE, routing_key="work", declare=[queue])
        bound = queue(conn.default_channel)
        first = bound.get()
        first.requeue()
        again = bound.get()
        assert again is not None and again.payload == {"n": 2}
        again.ack()
    assert _rows(db) == 0


def test_invisible_until_timeout(tmp_path: Path) -> None:
    db = tmp_path / "broker.db"
    url = f"sqla+sqlite:///{db}"
    queue = Queue("work", EXCHANGE, routing_key="work")
    with _conn(url, visibility=3600) as conn:
        conn.Producer().publish({"n": 3}, exchange=EXCHANGE, routing_key="work", declare=[queue])
        assert queue(conn.default_channel).get() is not None  # delivered, not acked
    # The connection closed cleanly: kombu restores the unacked message at once.
    with _conn(url, visibility=3600) as conn:
        message = queue(conn.default_channel).get()
        assert message is not None and message.payload == {"n": 3}
        message.ack()
    assert _rows(db) == 0
