"""The Alembic migrations are the schema: upgrading an empty database must give
exactly the tables, columns, indexes and unique keys the ORM models declare."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

import db.access
import db.batches  # noqa: F401  (puts the batch tables on Base.metadata)
from db import migrate
from db.models import Base


def test_upgrade_matches_models(db_url: str) -> None:
    migrate.upgrade(db_url)
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
            names = set(inspect(connection).get_table_names())
    finally:
        engine.dispose()
    assert diff == [], f"models and migrations differ: {diff}"
    assert set(Base.metadata.tables) <= names
    assert migrate.current_revision(db_url) is not None


def test_staff_query_indexes_exist(db_url: str) -> None:
    migrate.upgrade(db_url)
    engine = create_engine(db_url)
    try:
        inspector = inspect(engine)
        indexed = {
            (table, tuple(ix["column_names"]))
            for table in ("study", "result")
            for ix in inspector.get_indexes(table)
        }
        uniques = {tuple(uc["column_names"]) for uc in inspector.get_unique_constraints("result")}
    finally:
        engine.dispose()
    for column in ("patient_id", "accession_number", "study_date", "status"):
        assert ("study", (column,)) in indexed
    assert ("result", ("finding",)) in indexed
    assert ("study_id", "model_version_id", "revision") in uniques


def test_upgrade_twice_and_downgrade(db_url: str) -> None:
    migrate.upgrade(db_url)
    migrate.upgrade(db_url)  # idempotent: already at head
    migrate.downgrade(db_url, "base")
    engine = create_engine(db_url)
    try:
        left = set(inspect(engine).get_table_names()) & set(Base.metadata.tables)
    finally:
        engine.dispose()
    assert left == set()
