"""A batch on a real Celery worker (PostgreSQL, Redis, the shipped model): a realtime
study sent while a 200-study batch runs finishes long before the batch does, and each
batch study gets exactly one new revision.

The studies are one 64x64 chest radiograph each (the sample radiograph scaled down), so
200 of them run in well under a minute on two cores.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from sqlalchemy import update

from db import batches as store
from db.engine import session_scope
from db.models import Study, StudyStatus
from tests.batches.conftest import base_env, revisions_with_results
from tests.worker.conftest import wait_until
from tests.worker.studies import CXR, record_study
from worker import batches
from worker.app import PROCESS_STUDY, create_app
from worker.config import WorkerConfig
from worker.queues import QueueName

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

REDIS_URL = "redis://127.0.0.1:6379/13"
BATCH_SIZE = 200
SIDE = 64


def _small_radiograph(path: Path) -> Path:
    """The sample chest radiograph scaled to SIDE x SIDE, as its own DICOM file."""
    ds = pydicom.dcmread(CXR)
    small = Image.fromarray(ds.pixel_array).resize((SIDE, SIDE), Image.Resampling.BOX)
    ds.PixelData = np.asarray(small, dtype=ds.pixel_array.dtype).tobytes()
    ds.Rows = ds.Columns = SIDE
    ds.save_as(path)
    return path


def _completed_at(url: str, study_id: int) -> Any:
    with session_scope(url) as session:
        study = session.get(Study, study_id)
        assert study is not None
        return study.completed_at if study.status is StudyStatus.DONE else None


def test_realtime_study_overtakes_a_running_batch(
    pg_url: str, redis_server: str, spawn: Any, tmp_path: Path
) -> None:
    from model.inference import default_weights_path

    if not default_weights_path().exists():
        pytest.skip("no model weights")
    import redis

    broker = redis.Redis.from_url(REDIS_URL)
    broker.flushdb()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config = WorkerConfig(database_url=pg_url, broker_url=REDIS_URL, data_dir=data_dir,
                          results_dir=data_dir / "results")  # fmt: skip
    image = _small_radiograph(tmp_path / "small.dcm")
    archived = [record_study(config, [image]) for _ in range(BATCH_SIZE)]
    with session_scope(pg_url) as session:  # processed long ago
        session.execute(update(Study).values(status=StudyStatus.DONE))
    started = batches.start_batch(pg_url, store.Selector(everything=True), started_by="test")
    app = create_app(config)
    assert batches.pump_once(config, batches.celery_publish(app)) == BATCH_SIZE

    env = base_env(data_dir, PNEUMO_DATABASE_URL=pg_url, PNEUMO_BROKER_URL=REDIS_URL,
                   PNEUMO_TORCH_THREADS="1")  # fmt: skip
    spawn([sys.executable, "-m", "celery", "-A", "pneumo.celery_app", "worker",
           "-Q", f"{QueueName.REALTIME},{QueueName.BATCH}", "-c", "1", "--without-gossip",
           "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING"], env)  # fmt: skip

    def done_items() -> int:
        view = batches.view(config, started.batch_id)
        return 0 if view is None else view.counts["done"]

    wait_until(lambda: done_items() >= 1, 90, "the first batch study")
    realtime = record_study(config, [image])
    finished_before = done_items()
    app.send_task(PROCESS_STUDY, args=[realtime.study_id, realtime.revision],
                  queue=QueueName.REALTIME.value)  # fmt: skip
    wait_until(
        lambda: _completed_at(pg_url, realtime.study_id) is not None, 60, "the realtime study"
    )
    finished_then = done_items()
    wait_until(lambda: done_items() == BATCH_SIZE, 240, "the batch")

    view = batches.view(config, started.batch_id)
    assert view is not None and view.state is store.BatchState.DONE
    # Overtaking: it waited for the study in progress (and a prefetched one), not the queue.
    assert finished_then - finished_before <= 5, "the realtime study waited behind the batch"
    assert finished_then < BATCH_SIZE // 2
    assert view.finished_at is not None
    assert _completed_at(pg_url, realtime.study_id) < view.finished_at
    for study in archived:  # exactly one new revision each
        assert revisions_with_results(pg_url, study.study_id) == [2]
    broker.flushdb()
