"""A batch's life on PostgreSQL with ``process_study`` run in-process: exactly one new
revision per study under redelivery and retries, two batches in order, dry run,
cancel mid-batch, retry of the failed items."""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from db import batches as store
from db.engine import session_scope
from db.models import Job, Study, StudyStatus
from tests.batches.conftest import (
    FakeRun,
    Published,
    result_count,
    revisions_with_results,
    seed,
    study_row,
)
from worker import batches
from worker.app import PROCESS_STUDY, create_app
from worker.config import WorkerConfig

pytestmark = pytest.mark.postgres


def _run(config: WorkerConfig, messages: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Deliver each wake-up to ``process_study`` in this process."""
    task: Any = create_app(config).tasks[PROCESS_STUDY]
    return [task(study_id, revision) for study_id, revision in messages]


def _start(config: WorkerConfig, uids: list[str], **kwargs: Any) -> int:
    selector = store.Selector(study_uids=tuple(uids))
    return batches.start_batch(
        config.database_url, selector, started_by="cli:test", **kwargs
    ).batch_id


def test_one_request_makes_one_revision_per_study_despite_redelivery(
    config: WorkerConfig, fake_run: FakeRun
) -> None:
    url = config.database_url
    (a, uid_a), (b, uid_b) = seed(url), seed(url)
    batch_id = _start(config, [uid_a, uid_b])
    sent = Published()
    assert batches.pump_once(config, sent) == 2
    assert batches.pump_once(config, sent) == 0  # allocated once: a second pass publishes nothing
    assert sorted(sent.messages) == [(a, 2), (b, 2)]

    first = _run(config, sent.messages)
    redelivered = _run(config, sent.messages + sent.messages)  # broker redelivers, twice
    assert {r["status"] for r in first} == {"complete"}
    assert {r["status"] for r in redelivered} == {"already-done"}
    assert revisions_with_results(url, a) == revisions_with_results(url, b) == [1, 2]
    assert len(fake_run.calls) == 2
    view = batches.view(config, batch_id)
    assert view is not None and view.state is store.BatchState.DONE
    assert view.counts == {"queued": 0, "done": 2, "failed": 0, "cancelled": 0}


def test_a_retried_attempt_reuses_the_revision(
    config: WorkerConfig, fake_run: FakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    config = replace(config, task_max_retries=2)
    study_id, uid = seed(config.database_url)
    _start(config, [uid])
    sent = Published()
    batches.pump_once(config, sent)
    app = create_app(config)
    task: Any = app.tasks[PROCESS_STUDY]

    class Retried(Exception):
        pass

    def retry(**_: Any) -> Any:
        raise Retried

    monkeypatch.setattr(task, "retry", retry)
    fake_run.failing.add(study_id)
    with pytest.raises(Retried):
        task(*sent.messages[0])
    fake_run.failing.clear()
    assert task(*sent.messages[0])["status"] == "complete"  # the retry: same message, same revision
    assert revisions_with_results(config.database_url, study_id) == [1, 2]
    with session_scope(config.database_url) as session:
        attempts = session.execute(select(func.count()).select_from(Job)).scalar_one()
    assert attempts == 2 and study_row(config.database_url, study_id) == (StudyStatus.DONE, 2)


def test_two_batches_on_one_study_make_two_revisions_in_order(
    config: WorkerConfig, fake_run: FakeRun
) -> None:
    study_id, uid = seed(config.database_url)
    first, second = _start(config, [uid]), _start(config, [uid])
    sent = Published()
    batches.pump_once(config, sent)
    assert sent.messages == [(study_id, 2)]  # the second batch waits for the first
    _run(config, sent.messages)
    batches.pump_once(config, sent)
    assert sent.messages[1:] == [(study_id, 3)]
    _run(config, sent.messages[1:])
    assert revisions_with_results(config.database_url, study_id) == [1, 2, 3]
    with session_scope(config.database_url) as session:
        items = {b: store.batch_items(session, b)[0].revision for b in (first, second)}
    assert items == {first: 2, second: 3}


def test_dry_run_changes_nothing(
    config: WorkerConfig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pneumo.commands import operator

    url = config.database_url
    ids = [seed(url)[0] for _ in range(12)]
    before = [study_row(url, i) for i in ids]
    monkeypatch.setenv("PNEUMO_DATABASE_URL", url)
    monkeypatch.setenv("PNEUMO_DATA_DIR", str(config.data_dir))
    parser = argparse.ArgumentParser()
    operator.register(parser.add_subparsers())
    args = parser.parse_args(["reprocess", "--all", "--dry-run"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "would reprocess 12 study(ies)" in out and "... and 2 more" in out
    assert [study_row(url, i) for i in ids] == before
    with session_scope(url) as session:
        assert session.execute(select(func.count()).select_from(store.Batch)).scalar_one() == 0


def test_cancel_mid_batch_drops_queued_items_and_lets_started_ones_finish(
    config: WorkerConfig, fake_run: FakeRun
) -> None:
    url = config.database_url
    seeded = [seed(url) for _ in range(5)]
    batch_id = _start(config, [uid for _, uid in seeded], max_rate=1.0)
    created = batches.view(config, batch_id)
    assert created is not None
    sent = Published()
    batches.pump_once(config, sent, now=created.created_at + timedelta(seconds=3.5))
    assert len(sent.messages) == 3  # throttled: 1/s for 3.5 s; two not yet allocated
    _run(config, sent.messages[:1])  # one done
    started = sent.messages[1]
    with session_scope(url) as session:  # one attempt under way (its worker took it)
        session.execute(
            update(Study).where(Study.id == started[0]).values(status=StudyStatus.PROCESSING)
        )
    report = batches.cancel(config, batch_id)
    assert (report.dropped, report.running) == (3, 1)
    # the dropped item's wake-up arrives anyway: nothing runs, the study is as before
    dropped = sent.messages[2]
    assert _run(config, [dropped])[0]["status"] == "cancelled"
    assert study_row(url, dropped[0]) == (StudyStatus.DONE, 2)
    assert revisions_with_results(url, dropped[0]) == [1]
    assert _run(config, [started])[0]["status"] == "complete"  # the started one finishes
    assert batches.pump_once(config, sent) == 0  # nothing more is published
    view = batches.view(config, batch_id)
    assert view is not None and view.state is store.BatchState.CANCELLED
    assert view.counts == {"queued": 0, "done": 2, "failed": 0, "cancelled": 3}
    assert result_count(url) == 5 + 2


def test_retry_runs_only_the_failed_items(config: WorkerConfig, fake_run: FakeRun) -> None:
    url = config.database_url
    (good, uid_good), (bad, uid_bad) = seed(url), seed(url)
    batch_id = _start(config, [uid_good, uid_bad])
    fake_run.failing.add(bad)
    sent = Published()
    batches.pump_once(config, sent)
    _run(config, sent.messages)
    view = batches.view(config, batch_id)
    assert view is not None and view.state is store.BatchState.DONE
    assert (view.counts["done"], view.counts["failed"]) == (1, 1)
    assert study_row(url, bad) == (StudyStatus.DEAD_LETTER, 2)

    fake_run.failing.clear()
    assert batches.retry(config, batch_id) == 1
    retried = Published()
    batches.pump_once(config, retried)
    assert retried.messages == [(bad, 3)]  # a new revision for the failed study only
    _run(config, retried.messages)
    view = batches.view(config, batch_id)
    assert view is not None and view.state is store.BatchState.DONE
    assert view.counts == {"queued": 0, "done": 2, "failed": 0, "cancelled": 0}
    assert revisions_with_results(url, good) == [1, 2]
    assert revisions_with_results(url, bad) == [1, 3]
    assert batches.retry(config, 999) is None


def test_reprocess_wait_follows_the_batch_to_its_end(
    config: WorkerConfig,
    fake_run: FakeRun,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pneumo.commands import operator

    url = config.database_url
    ids = [seed(url)[0] for _ in range(3)]
    task: Any = create_app(config).tasks[PROCESS_STUDY]
    # the "broker": each wake-up runs at once, in this process
    monkeypatch.setattr(batches, "celery_publish", lambda app: lambda s, r: task(s, r))
    monkeypatch.setenv("PNEUMO_DATABASE_URL", url)
    monkeypatch.setenv("PNEUMO_BROKER_URL", "memory://")
    monkeypatch.setenv("PNEUMO_DATA_DIR", str(config.data_dir))
    parser = argparse.ArgumentParser()
    operator.register(parser.add_subparsers())
    args = parser.parse_args(["reprocess", "--status", "done", "--wait", "--max-rate", "50/s"])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert "done=3" in captured.out and "failed=0" in captured.out
    assert "batch 1" in captured.err  # the tqdm bar
    assert all(revisions_with_results(url, i) == [1, 2] for i in ids)

    args = parser.parse_args(["batches", "show", "1"])
    assert args.func(args) == 0
    assert "cli:" in capsys.readouterr().out
    args = parser.parse_args(["batches", "cancel", "2"])
    assert args.func(args) == 1


def test_models_list_marks_the_weights_in_use(
    config: WorkerConfig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from db import repository as repo
    from model.inference import default_weights_path, sha256_file
    from pneumo.commands import operator

    weights = default_weights_path()
    if not weights.is_file():
        pytest.skip("no model weights")
    with session_scope(config.database_url) as session:
        repo.ensure_model_version(session, name="pneumonet", version="0.9.0", sha256="c" * 64,
                                  threshold=0.4)  # fmt: skip
        repo.ensure_model_version(session, name="pneumonet", version="1.0.0",
                                  sha256=sha256_file(weights), threshold=0.5)  # fmt: skip
    monkeypatch.setenv("PNEUMO_DATABASE_URL", config.database_url)
    monkeypatch.setenv("PNEUMO_DATA_DIR", str(config.data_dir))
    monkeypatch.delenv("PNEUMO_MODEL_PATH", raising=False)
    parser = argparse.ArgumentParser()
    operator.register(parser.add_subparsers())
    args = parser.parse_args(["models", "--format", "json", "list"])
    assert args.func(args) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {m["label"]: m["active"] for m in listed["models"]} == {
        "pneumonet-1.0.0": True,
        "pneumonet-0.9.0": False,
    }
