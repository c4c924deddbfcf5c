"""Database fixtures: a fresh SQLite file, and a throwaway PostgreSQL database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.db.postgres import throwaway_database


@pytest.fixture
def pg_url(postgres_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database, dropped afterwards."""
    with throwaway_database(postgres_url) as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each supported backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'pneumo.db'}"
    return str(request.getfixturevalue("pg_url"))
