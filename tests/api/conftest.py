"""Fixtures of the staff API tests: a seeded PostgreSQL database, a token per role, the app."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from db import access
from db.access import Role
from db.engine import session_scope
from tests.api.seed import SeededStudy, seed
from tests.conftest import serve_app
from tests.db.postgres import throwaway_database


@dataclass(frozen=True)
class StaffDb:
    url: str
    data_dir: Path
    studies: list[SeededStudy]
    tokens: dict[str, str]  # role value (and "revoked") -> token


@pytest.fixture
def staff_db(postgres_url: str, tmp_path: Path) -> Iterator[StaffDb]:
    """A throwaway PostgreSQL database with the seeded studies and one token per role."""
    with throwaway_database(postgres_url) as url:
        studies = seed(url, tmp_path / "data")
        tokens: dict[str, str] = {}
        with session_scope(url) as s:
            for role in Role:
                tokens[role.value] = access.create_token(s, user=f"{role.value}-user", role=role)[1]
            revoked_id, tokens["revoked"] = access.create_token(s, user="gone", role=Role.ADMIN)
            access.revoke_token(s, revoked_id)
        yield StaffDb(url, tmp_path / "data", studies, tokens)


def app_for(db: StaffDb):  # type: ignore[no-untyped-def]
    from pneumo.api.app import create_app
    from pneumo.settings import load_settings

    settings = load_settings(
        database_url=db.url, data_dir=db.data_dir, broker_url="redis://127.0.0.1:6379/15"
    )
    return create_app(settings)


@pytest.fixture
def client(staff_db: StaffDb) -> Iterator[TestClient]:
    with TestClient(app_for(staff_db)) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def live_server(staff_db: StaffDb) -> Iterator[str]:
    """The app served by a real uvicorn on a free loopback port; yields its base URL."""
    yield from serve_app(app_for(staff_db))
