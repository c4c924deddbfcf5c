"""Batch fixtures: a migrated throwaway PostgreSQL database, seeded studies, in-process tasks.

``seed`` writes studies as the pipeline leaves them (status, revision, newest
result with its model, finding and flags) without running the model; the
in-process task tests replace :func:`worker.pipeline.run_study` by
:class:`FakeRun`, which saves a result row for the revision it is given.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from db import migrate
from db import repository as repo
from db.engine import session_scope
from db.models import Result, ResultStatus, Study, StudyStatus
from tests.db.postgres import throwaway_database
from worker.config import WorkerConfig


@pytest.fixture
def pg_url(postgres_url: str) -> Iterator[str]:
    """A new PostgreSQL database at the newest schema, dropped afterwards."""
    with throwaway_database(postgres_url) as url:
        migrate.upgrade(url)
        yield url


@pytest.fixture
def config(tmp_path: Path, pg_url: str) -> WorkerConfig:
    return WorkerConfig(
        database_url=pg_url,
        broker_url="memory://",
        data_dir=tmp_path,
        results_dir=tmp_path / "results",
        task_max_retries=0,  # the first failure dead-letters: quick failed items
        task_retry_backoff_seconds=0.1,
    )


def seed(
    url: str,
    *,
    status: StudyStatus = StudyStatus.DONE,
    revision: int = 1,
    model: str | None = "1.0.0",
    finding: bool | None = True,
    flags: tuple[str, ...] = (),
    result_status: ResultStatus = ResultStatus.COMPLETE,
    study_date: date | None = None,
    received_at: datetime | None = None,
) -> tuple[int, str]:
    """One study in ``status`` at ``revision``, with a result by ``model`` (None: no result)."""
    uid = generate_uid()
    with session_scope(url) as session:
        study_id = repo.ensure_study(session, uid, repo.StudyHeader(study_date=study_date))
        study = session.get(Study, study_id)
        assert study is not None
        study.status, study.revision = status, revision
        if received_at is not None:
            study.received_at = received_at
        if model is not None:
            model_id = repo.ensure_model_version(
                session, name="pneumonet", version=model, sha256="a" * 64, threshold=0.5
            )
            repo.save_result(
                session,
                repo.ResultRecord(
                    study_id,
                    model_id,
                    revision,
                    result_status,
                    None if finding is None else (0.9 if finding else 0.1),
                    finding,
                    0.5,
                    False,
                    "outside-intended-use" in flags,
                    flags,
                ),  # fmt: skip
                [],
            )
    return study_id, uid


def revisions_with_results(url: str, study_id: int) -> list[int]:
    with session_scope(url) as session:
        return sorted(
            session.execute(select(Result.revision).where(Result.study_id == study_id)).scalars()
        )


def study_row(url: str, study_id: int) -> tuple[StudyStatus, int]:
    with session_scope(url) as session:
        study = session.get(Study, study_id)
        assert study is not None
        return study.status, study.revision


def result_count(url: str) -> int:
    with session_scope(url) as session:
        return int(session.execute(select(func.count()).select_from(Result)).scalar_one())


@dataclass
class FakeRun:
    """Stands in for :func:`worker.pipeline.run_study`: saves a result by model 2.0.0.

    Studies in ``failing`` raise instead; ``calls`` lists every (study, revision) run.
    """

    failing: set[int] = field(default_factory=set)
    calls: list[tuple[int, int]] = field(default_factory=list)

    def __call__(self, config: WorkerConfig, study_id: int, revision: int, **_: Any) -> Any:
        self.calls.append((study_id, revision))
        if study_id in self.failing:
            raise RuntimeError("synthetic failure")
        with session_scope(config.database_url) as session:
            model_id = repo.ensure_model_version(
                session, name="pneumonet", version="2.0.0", sha256="b" * 64, threshold=0.5
            )
            record = repo.ResultRecord(
                study_id, model_id, revision, ResultStatus.COMPLETE, 0.7, True, 0.5, False, False
            )
            result_id = repo.save_result(session, record, [])
        return SimpleNamespace(result_id=result_id, files=(), status=ResultStatus.COMPLETE)


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch) -> FakeRun:
    import worker.pipeline

    fake = FakeRun()
    monkeypatch.setattr(worker.pipeline, "run_study", fake)
    return fake


@dataclass
class Published:
    """A :data:`worker.batches.Publish` that records instead of sending."""

    messages: list[tuple[int, int]] = field(default_factory=list)

    def __call__(self, study_id: int, revision: int) -> None:
        self.messages.append((study_id, revision))


def now() -> datetime:
    return datetime.now(UTC)


# Real worker subprocesses (stopped at teardown) and their environment.
from tests.worker.conftest import base_env, spawn  # noqa: E402, F401
