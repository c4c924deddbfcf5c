"""A study that fails every attempt is retried a bounded number of times with
backoff, then marked dead-letter in the database, each attempt a job row."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select

from db import migrate
from db import repository as repo
from db.engine import session_scope
from db.models import Job, JobStatus, Study, StudyStatus
from pneumo.settings import Settings
from worker.app import PROCESS_STUDY, create_app
from worker.queues import QueueName

STUDY = "1.2.826.0.1.3680043.8.498.77"


def test_failing_study_ends_in_dead_letter(broker_env, spawn, waiter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = dict(
        broker_env,
        # A weights file that does not exist: every attempt fails before inference.
        PNEUMO_MODEL_PATH=str(tmp_path / "missing-weights.pt"),
        PNEUMO_TASK_MAX_RETRIES="2",
        PNEUMO_TASK_RETRY_BACKOFF_SECONDS="0.2",
    )
    settings = Settings(
        data_dir=Path(env["PNEUMO_DATA_DIR"]),
        broker_url=env.get("PNEUMO_BROKER_URL"),
        database_url=env.get("PNEUMO_DATABASE_URL"),
    )
    url = settings.effective_database_url
    migrate.upgrade(url)
    dcm = tmp_path / "x.dcm"
    dcm.write_bytes(b"not used: the model fails first")
    with session_scope(url) as session:
        repo.record_instance(
            session,
            repo.InstanceRecord(
                study_uid=STUDY,
                series_uid=f"{STUDY}.1",
                sop_instance_uid=f"{STUDY}.1.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=str(dcm),
                size=10,
                calling_aet="TEST",
                received_at=datetime.now(UTC),
            ),
        )
        study_id, revision = repo.mark_study_queued(session, STUDY, amended=False)
    create_app(settings.worker_config()).send_task(
        PROCESS_STUDY, args=[study_id, revision], queue=QueueName.REALTIME.value
    )

    worker = spawn([sys.executable, "-m", "pneumo.cli", "worker", "--concurrency", "1"], env)

    def dead() -> bool:
        with session_scope(url) as session:
            return session.get(Study, study_id).status is StudyStatus.DEAD_LETTER

    waiter(dead, 120, "dead-letter status")
    with session_scope(url) as session:
        jobs = (
            session.execute(select(Job).where(Job.study_id == study_id).order_by(Job.id))
            .scalars()
            .all()
        )
        study = session.get(Study, study_id)
        assert [j.status for j in jobs] == [JobStatus.RETRYING] * 2 + [JobStatus.DEAD_LETTER]
        assert [j.attempt for j in jobs] == [0, 1, 2]
        assert all(j.error and j.queue == "realtime" and j.worker_host for j in jobs)
        assert study.last_error
        assert repo.recent_errors(session)[0].status == "dead-letter"
    assert worker.poll() is None  # the worker survived
