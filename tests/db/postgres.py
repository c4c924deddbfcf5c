"""A throwaway PostgreSQL database beside the shared one: created, handed out, dropped."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

__all__ = ["throwaway_database"]


@contextmanager
def throwaway_database(admin_url: str) -> Iterator[str]:
    """The URL of a new, empty database on ``admin_url``'s server; dropped afterwards.

    Skips the test when the server refuses (down, or no right to create databases).
    """
    name = f"pneumo_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(
        admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 2}
    )
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception:
        admin.dispose()
        pytest.skip("PostgreSQL refused to create a test database")
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        from db.engine import get_engine

        get_engine.cache_clear()  # release pooled connections; FORCE ends the rest
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
