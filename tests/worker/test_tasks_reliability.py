"""``process_study`` never acknowledges a message whose outcome is not recorded.

A database that cannot be reached at pick-up makes the task retry (a new
message, with backoff) instead of failing and being acknowledged; the retry
carries only the error's type names, never the SQL or its parameters. A task
killed at the hard time limit is requeued, and a killed pool child's message too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.reliability.services import free_port
from worker.app import PROCESS_STUDY, celery_config, create_app
from worker.config import WorkerConfig
from worker.tasks import DB_RETRY_MAX_SECONDS, AttemptError


class RetryAsked(Exception):
    def __init__(self, exc: BaseException | None, countdown: float | None) -> None:
        super().__init__("retry")
        self.exc = exc
        self.countdown = countdown


def config(tmp_path: Path, database_url: str) -> WorkerConfig:
    return WorkerConfig(
        database_url=database_url,
        broker_url="memory://",
        data_dir=tmp_path,
        results_dir=tmp_path / "results",
        task_retry_backoff_seconds=0.5,
    )


def test_database_down_at_pickup_retries_instead_of_acknowledging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens on this port: the first session of the task fails to connect.
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nowhere?connect_timeout=2"
    app = create_app(config(tmp_path, url))
    task: Any = app.tasks[PROCESS_STUDY]

    def retry(*, exc: BaseException | None = None, countdown: float | None = None) -> Any:
        raise RetryAsked(exc, countdown)

    monkeypatch.setattr(task, "retry", retry)
    with pytest.raises(RetryAsked) as asked:
        task(1, 1)
    assert isinstance(asked.value.exc, AttemptError)
    assert str(asked.value.exc) == "OperationalError: OperationalError"  # no SQL, no parameters
    assert asked.value.countdown is not None
    assert 0 < asked.value.countdown <= DB_RETRY_MAX_SECONDS


def test_time_limit_and_lost_children_requeue(tmp_path: Path) -> None:
    settings = celery_config(config(tmp_path, "sqlite://"))
    assert settings["task_acks_late"] is True
    assert settings["task_acks_on_timeout"] is False  # requeued; the next delivery counts it
    assert settings["task_reject_on_worker_lost"] is True
    assert "task_acks_on_failure_or_timeout" not in settings
