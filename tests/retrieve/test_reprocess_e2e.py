"""End to end on a real Celery worker (PostgreSQL, Redis, the shipped model): a study is
processed, its spooled pixels purged, and reprocessing fetches them back from
``dcmqrscp`` (``PNEUMO_PACS``) and processes it again."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from db import repository as repo
from db.batches import Selector, select_studies
from db.engine import session_scope
from db.models import Instance, Job, JobKind, JobStatus, Result, ResultStatus, Study, StudyStatus
from dicom_io.spool import Spool
from tests.retrieve.conftest import DcmQrScp
from tests.worker.conftest import base_env, wait_until
from tests.worker.studies import CXR, record_study
from worker.app import PROCESS_STUDY, create_app
from worker.config import WorkerConfig
from worker.intake import Intake, PixelsPurgedError
from worker.queues import QueueName
from worker.retention import purge_spool

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

REDIS_URL = "redis://127.0.0.1:6379/10"


def _study(url: str, study_id: int) -> tuple[StudyStatus, int, str | None]:
    with session_scope(url) as session:
        study = session.get(Study, study_id)
        assert study is not None
        return study.status, study.revision, study.last_error


def _results(url: str, study_id: int) -> dict[int, ResultStatus]:
    with session_scope(url) as session:
        rows = session.execute(
            select(Result.revision, Result.status).where(Result.study_id == study_id)
        ).all()
    return {int(revision): status for revision, status in rows}


def _into_spool_layout(url: str, spool_dir: Path, study_id: int, paths: tuple[Path, ...]) -> None:
    """Move recorded files where the listener puts them (``study/series/sop.dcm``)."""
    spool, moved = Spool(spool_dir), {}
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        target = spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
        moved[str(ds.SOPInstanceUID)] = str(target)
    with session_scope(url) as session:
        repo.record_retrieved_files(session, study_id, moved)


def test_purged_study_is_retrieved_from_the_pacs_and_processed_again(
    pg_url: str, redis_server: str, spawn: Any, tmp_path: Path, dcmqrscp: Callable[..., DcmQrScp]
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
                          results_dir=data_dir / "results", task_max_retries=0)  # fmt: skip
    study = record_study(config, [CXR], age="006Y")
    pacs = dcmqrscp(list(study.paths))  # the PACS keeps its own copy
    _into_spool_layout(pg_url, data_dir / "spool", study.study_id, study.paths)

    env = base_env(data_dir, PNEUMO_DATABASE_URL=pg_url, PNEUMO_BROKER_URL=REDIS_URL,
                   PNEUMO_PACS=str(pacs.address), PNEUMO_RETRIEVE_METHOD="get",
                   PNEUMO_TASK_MAX_RETRIES="0", PNEUMO_TORCH_THREADS="1")  # fmt: skip
    spawn([sys.executable, "-m", "celery", "-A", "pneumo.celery_app", "worker",
           "-Q", f"{QueueName.REALTIME},{QueueName.BATCH}", "-c", "1", "--without-gossip",
           "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING"], env)  # fmt: skip
    app = create_app(config)
    app.send_task(PROCESS_STUDY, args=[study.study_id, study.revision],
                  queue=QueueName.REALTIME.value)  # fmt: skip
    wait_until(lambda: _study(pg_url, study.study_id)[0] is StudyStatus.DONE, 120, "processing")

    report = purge_spool(pg_url, data_dir / "spool", older_than_days=0)
    assert (report.files_deleted, report.instances_marked) == (1, 1)

    # A batch leaves a purged study out unless asked to include it (a PACS is configured).
    selector = Selector(study_uids=(study.study_uid,))
    with session_scope(pg_url) as session:
        left_out = select_studies(session, selector)
        kept = select_studies(session, selector, include_purged=True)
    assert (left_out.study_ids, left_out.purged) == ((), (study.study_uid,))
    assert (kept.study_ids, kept.purged) == ((study.study_id,), ())

    # `pneumo reprocess` (Intake.reprocess): without a PACS it refuses a purged study;
    # with one, the study is queued again on the batch queue, its result to be replaced.
    with pytest.raises(PixelsPurgedError, match="no PACS"):
        Intake(config, app).reprocess(study.study_uid)
    pacs_config = dataclasses.replace(config, pacs=pacs.address)
    study_id = Intake(pacs_config, create_app(pacs_config)).reprocess(study.study_uid)
    revision = _study(pg_url, study_id)[1]
    assert revision == study.revision  # Intake.reprocess reruns the same revision
    wait_until(
        lambda: (
            _study(pg_url, study_id)[:2] in ((StudyStatus.DONE, revision),)
            or _study(pg_url, study_id)[0] is StudyStatus.DEAD_LETTER
        ),
        120,
        "reprocessing",
    )

    assert _study(pg_url, study_id) == (StudyStatus.DONE, revision, None)
    with session_scope(pg_url) as session:
        jobs = session.execute(
            select(Job.status)
            .where(Job.study_id == study_id, Job.kind == JobKind.PROCESS)
            .order_by(Job.id)
        ).scalars()
        assert list(jobs) == [JobStatus.SUCCEEDED, JobStatus.SUCCEEDED]  # processed twice
    # Read from the retrieved file: without it the rerun would say "no usable image".
    assert _results(pg_url, study_id) == {revision: ResultStatus.COMPLETE}
    with session_scope(pg_url) as session:
        ((path, reason),) = session.execute(
            select(Instance.path, Instance.skip_reason).where(Instance.study_id == study_id)
        ).all()
    assert reason != repo.PIXELS_PURGED and Path(path).is_file()
    assert Path(path).is_relative_to(data_dir / "spool" / study.study_uid)
    broker.flushdb()
