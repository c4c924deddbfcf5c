"""Engines and sessions for SQLite (embedded default) and PostgreSQL (production)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = [
    "CONNECT_TIMEOUT_SECONDS",
    "SQLITE_BUSY_TIMEOUT_SECONDS",
    "check_connection",
    "get_engine",
    "make_engine",
    "session_factory",
    "session_scope",
]


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    # WAL lets the listener write while workers read; busy_timeout makes
    # concurrent writers (several processes on one file) wait instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_SECONDS * 1000}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


# Bounds on how long a caller (the listener's C-STORE handler among them) can
# wait for the database: a PostgreSQL connection attempt, and a SQLite writer
# waiting for another process's lock. An outage then costs a logged failure,
# not a hung handler; the study is retried from the spool journal.
CONNECT_TIMEOUT_SECONDS = 5
SQLITE_BUSY_TIMEOUT_SECONDS = 30

_PRIVATE_DIR = 0o700
_PRIVATE_FILE = 0o600


def _private_sqlite_file(database: Path) -> None:
    """Create the SQLite file's folder 0700 and the file itself 0600 (it holds PHI).

    SQLite gives its ``-wal`` and ``-shm`` files the database file's mode, so
    they are private too. A folder that already exists keeps its mode (it may
    be shared, e.g. ``/tmp``); a database file that exists is made 0600 when we own it.
    """
    missing = [d for d in (database.parent, *database.parent.parents) if not d.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=_PRIVATE_DIR, exist_ok=True)
        os.chmod(folder, _PRIVATE_DIR)  # mkdir's mode is filtered by the umask
    fd = os.open(database, os.O_RDONLY | os.O_CREAT, _PRIVATE_FILE)
    try:
        if os.fstat(fd).st_uid == os.geteuid():  # only the owner may (and needs to) chmod
            os.fchmod(fd, _PRIVATE_FILE)
    finally:
        os.close(fd)


def make_engine(url: str) -> Engine:
    """A new engine for ``url``; SQLite files get a private folder and file, and pragmas.

    PostgreSQL connections time out after :data:`CONNECT_TIMEOUT_SECONDS`
    unless the URL sets ``connect_timeout`` itself.

    Raises:
        OSError: the SQLite file or its folder cannot be created.
        sqlalchemy.exc.ArgumentError: ``url`` is not a database URL.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            _private_sqlite_file(Path(parsed.database))
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = CONNECT_TIMEOUT_SECONDS
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """The process-wide engine for ``url`` (one pool per process)."""
    return make_engine(url)


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on any exception."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def check_connection(session: Session) -> None:
    """Round-trip one trivial statement: the database answers (health checks).

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database cannot be reached or refused it.
    """
    session.execute(text("SELECT 1"))
