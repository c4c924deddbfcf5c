"""``pneumo models activate``: which model new work uses, checked by sha256 before use.

The CLI registers a weights file (its own name, version, threshold, sha256) or
activates a known version; a real Celery worker (PostgreSQL, Redis) picks a new
activation up at its next study without a restart, and refuses a file whose sha256
is not the one recorded: the study is dead-lettered with the reason, the worker
keeps serving.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from db.engine import session_scope
from db.models import ModelActivation, ModelVersion, Result, Study, StudyStatus
from tests.batches.conftest import base_env
from tests.worker.conftest import wait_until
from tests.worker.studies import CXR, record_study
from worker.app import PROCESS_STUDY, create_app
from worker.config import WorkerConfig
from worker.queues import QueueName

pytestmark = pytest.mark.postgres

REDIS_URL = "redis://127.0.0.1:6379/12"


def _shipped() -> Path:
    """The shipped pneumonet-1.0.0 (not the default 2.0.0: the tests name its version)."""
    from model.inference import WEIGHTS_DIR

    weights = WEIGHTS_DIR / "pneumonet-1.0.0.pt"
    if not weights.is_file():
        pytest.skip("no model weights")
    return weights


def _variant(path: Path, version: str, threshold: float) -> Path:
    """The shipped weights saved as another model version (recalibrated: a new threshold)."""
    import torch

    from model.inference import read_weights_file

    payload = read_weights_file(_shipped())
    payload.update(version=version, threshold=threshold)
    torch.save(payload, path)
    return path


def _cli(monkeypatch: pytest.MonkeyPatch, config: WorkerConfig, *argv: str) -> int:
    from pneumo.commands import operator

    monkeypatch.setenv("PNEUMO_DATABASE_URL", config.database_url)
    monkeypatch.setenv("PNEUMO_DATA_DIR", str(config.data_dir))
    monkeypatch.delenv("PNEUMO_MODEL_PATH", raising=False)
    parser = argparse.ArgumentParser()
    operator.register(parser.add_subparsers())
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def _listed(
    monkeypatch: pytest.MonkeyPatch, config: WorkerConfig, capsys: pytest.CaptureFixture[str]
) -> dict[str, Any]:
    capsys.readouterr()
    assert _cli(monkeypatch, config, "models", "--format", "json", "list") == 0
    listed: dict[str, Any] = json.loads(capsys.readouterr().out)
    return listed


def test_activate_by_path_or_version_and_refusals(
    config: WorkerConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    shipped = _shipped()
    variant = _variant(tmp_path / "pneumonet-1.0.1.pt", "1.0.1", 0.3)

    assert _cli(monkeypatch, config, "models", "activate", "1.0.0") == 2  # not known yet
    assert "unknown model version" in capsys.readouterr().err
    assert _cli(monkeypatch, config, "models", "activate", str(variant)) == 0
    listed = _listed(monkeypatch, config, capsys)
    assert listed["active"]["label"] == "pneumonet-1.0.1"
    assert listed["active"]["path"] == str(variant.resolve())
    assert listed["active"]["threshold"] == pytest.approx(0.3)
    assert {m["label"]: m["active"] for m in listed["models"]} == {"pneumonet-1.0.1": True}

    assert _cli(monkeypatch, config, "models", "activate", str(shipped)) == 0
    assert _cli(monkeypatch, config, "models", "activate", "pneumonet-1.0.1") == 0  # by label
    listed = _listed(monkeypatch, config, capsys)
    assert listed["active"]["label"] == "pneumonet-1.0.1"
    assert {m["label"]: m["active"] for m in listed["models"]} == {
        "pneumonet-1.0.1": True,
        "pneumonet-1.0.0": False,
    }
    assert _cli(monkeypatch, config, "models", "activate", "1.0.0") == 0  # found where shipped
    assert _listed(monkeypatch, config, capsys)["active"]["path"] == str(shipped.resolve())

    clash = _variant(tmp_path / "other.pt", "1.0.1", 0.2)  # same version, other contents
    assert _cli(monkeypatch, config, "models", "activate", str(clash)) == 2
    assert "already registered" in capsys.readouterr().err
    not_weights = tmp_path / "junk.pt"
    not_weights.write_bytes(b"not a weights file")
    assert _cli(monkeypatch, config, "models", "activate", str(not_weights)) == 2
    variant.unlink()  # its only known file is gone, and no other file has its sha256
    assert _cli(monkeypatch, config, "models", "activate", "1.0.1") == 2
    assert "activate it by PATH" in capsys.readouterr().err

    with session_scope(config.database_url) as session:
        history = session.execute(
            select(ModelVersion.version)
            .join(ModelActivation, ModelActivation.model_version_id == ModelVersion.id)
            .order_by(ModelActivation.id)
        ).scalars()
        assert list(history) == ["1.0.1", "1.0.0", "1.0.1", "1.0.0"]  # refusals add nothing
        assert session.execute(select(func.count()).select_from(ModelVersion)).scalar_one() == 2


def _outcome(url: str, study_id: int) -> tuple[StudyStatus, str | None, str | None]:
    """(status, version of the newest result, last error) of a study."""
    with session_scope(url) as session:
        study = session.get(Study, study_id)
        assert study is not None
        version = session.execute(
            select(ModelVersion.version)
            .join(Result, Result.model_version_id == ModelVersion.id)
            .where(Result.study_id == study_id)
            .order_by(Result.id.desc())
            .limit(1)
        ).scalar_one_or_none()
        return study.status, version, study.last_error


@pytest.mark.redis
def test_worker_uses_each_new_activation_and_refuses_a_changed_file(
    config: WorkerConfig,
    pg_url: str,
    redis_server: str,
    spawn: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import redis

    shipped = _shipped()
    broker = redis.Redis.from_url(REDIS_URL)
    broker.flushdb()
    app = create_app(replace(config, broker_url=REDIS_URL))
    env = base_env(config.data_dir, PNEUMO_DATABASE_URL=pg_url, PNEUMO_BROKER_URL=REDIS_URL,
                   PNEUMO_TASK_MAX_RETRIES="0", PNEUMO_TORCH_THREADS="1")  # fmt: skip
    worker = spawn([sys.executable, "-m", "celery", "-A", "pneumo.celery_app", "worker",
                    "-Q", QueueName.REALTIME.value, "-c", "1", "--without-gossip",
                    "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING"],
                   env)  # fmt: skip

    def process() -> tuple[StudyStatus, str | None, str | None]:
        study = record_study(config, [CXR])
        app.send_task(PROCESS_STUDY, args=[study.study_id, study.revision],
                      queue=QueueName.REALTIME.value)  # fmt: skip
        settled = (StudyStatus.DONE, StudyStatus.DEAD_LETTER)
        wait_until(lambda: _outcome(pg_url, study.study_id)[0] in settled, 120, "the study")
        return _outcome(pg_url, study.study_id)

    assert _cli(monkeypatch, config, "models", "activate", str(shipped)) == 0
    assert process()[:2] == (StudyStatus.DONE, "1.0.0")
    variant = _variant(tmp_path / "pneumonet-1.0.1.pt", "1.0.1", 0.3)
    assert _cli(monkeypatch, config, "models", "activate", str(variant)) == 0
    assert process()[:2] == (StudyStatus.DONE, "1.0.1")  # same worker, no restart

    copy = shutil.copyfile(variant, tmp_path / "copy.pt")
    assert _cli(monkeypatch, config, "models", "activate", str(copy)) == 0
    _variant(copy, "1.0.1", 0.2)  # the activated file is replaced before the worker loads it
    status, version, error = process()
    assert (status, version) == (StudyStatus.DEAD_LETTER, None)
    assert error is not None and "sha256" in error and "refusing to load" in error
    assert worker.poll() is None  # refused, not crashed

    shutil.copyfile(variant, copy)  # the recorded contents are back
    assert process()[:2] == (StudyStatus.DONE, "1.0.1")
    broker.flushdb()
