"""Retention: ``pneumo purge`` deletes spooled pixels of old finished studies, keeps rows."""

from __future__ import annotations

import os
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import func, select, update

from db import repository as repo
from db.engine import session_scope
from db.models import (
    ImageResult,
    Instance,
    Result,
    ResultStatus,
    SelectionStatus,
    Study,
    StudyStatus,
)
from dicom_io.spool import Spool
from tests.dicom_receive.dicom_receive_helpers import encode_wire, make_instance
from tests.paths import REPO
from tests.worker.studies import worker_config
from worker.config import WorkerConfig
from worker.intake import Intake, PixelsPurgedError
from worker.retention import purge_spool

PNEUMO = REPO / ".venv" / "bin" / "pneumo"


def _received(
    config: WorkerConfig, status: StudyStatus, days_ago: float, *, sop_uid: str | None = None
) -> tuple[str, Path]:
    """One single-instance study in the real spool layout, recorded with ``status``."""
    spool = Spool(config.data_dir / "spool")
    ds = make_instance(_uid(), sop_uid=sop_uid)
    stored = spool.store(
        encode_wire(ds),
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    ).instance
    then = time.time() - days_ago * 86400
    os.utime(stored.path, (then, then))
    with session_scope(config.database_url) as session:
        repo.record_instance(
            session,
            repo.InstanceRecord(
                stored.study_uid, stored.series_uid, stored.sop_instance_uid,
                stored.sop_class_uid, stored.transfer_syntax_uid, str(stored.path),
                stored.size, "MOD", stored.received_at,
            ),
        )  # fmt: skip
        study_id, _ = repo.mark_study_queued(session, stored.study_uid, amended=False)
        session.execute(
            update(Study)
            .where(Study.id == study_id)
            .values(status=status, received_at=datetime.now(UTC) - timedelta(days=days_ago))
        )
        instance_id = session.execute(
            select(Instance.id).where(
                Instance.sop_instance_uid == stored.sop_instance_uid, Instance.study_id == study_id
            )
        ).scalar_one_or_none()
        if instance_id is None:  # refused: its SOP Instance UID belongs to another study
            return stored.study_uid, stored.path
        model = repo.ensure_model_version(
            session, name="m", version="1", sha256="a" * 64, threshold=0.5
        )
        record = repo.ResultRecord(
            study_id=study_id, model_version_id=model, revision=1,
            status=ResultStatus.COMPLETE, probability=0.2, finding=False, threshold=0.5,
            ood=False, outside_intended_use=False, flags=(), timings={},
        )  # fmt: skip
        repo.save_result(session, record, [repo.ImageOutcome(instance_id, 0.2, 0.1, True, False)])
    return stored.study_uid, stored.path


_counter = iter(range(1, 10_000))


def _uid() -> str:
    return f"1.2.826.0.1.3680043.8.498.{os.getpid()}.{next(_counter)}"


def test_only_old_finished_studies_lose_their_pixels_and_it_is_recorded(tmp_path: Path) -> None:
    config = worker_config(tmp_path)
    old_done = _received(config, StudyStatus.DONE, 40)
    old_dead = _received(config, StudyStatus.DEAD_LETTER, 40)
    old_queued = _received(config, StudyStatus.QUEUED, 40)  # not finished: kept
    new_done = _received(config, StudyStatus.DONE, 1)  # too recent: kept

    dry = purge_spool(
        config.database_url, config.data_dir / "spool", older_than_days=30, dry_run=True
    )
    assert (dry.studies, dry.files_deleted) == (2, 0) and old_done[1].exists()

    report = purge_spool(config.database_url, config.data_dir / "spool", older_than_days=30)

    assert (report.studies, report.files_deleted, report.instances_marked) == (2, 2, 2)
    assert not old_done[1].exists() and not old_dead[1].exists()
    assert old_queued[1].exists() and new_done[1].exists()
    with session_scope(config.database_url) as session:
        assert session.execute(select(func.count()).select_from(Instance)).scalar_one() == 4
        assert session.execute(select(func.count()).select_from(Result)).scalar_one() == 4
        for uid, expected in [(old_done[0], True), (old_queued[0], False), (new_done[0], False)]:
            assert repo.study_pixels_purged(session, uid) is expected
        purged = (
            session.execute(select(Instance).where(Instance.skip_reason == repo.PIXELS_PURGED))
            .scalars()
            .all()
        )
        assert {i.selection for i in purged} == {SelectionStatus.SKIPPED}
    again = purge_spool(config.database_url, config.data_dir / "spool", older_than_days=30)
    assert (again.studies, again.files_deleted) == (0, 0)

    intake = Intake(config=config, app=None)  # type: ignore[arg-type]  # refused before any publish
    with pytest.raises(PixelsPurgedError):
        intake.reprocess(old_done[0])


def test_purge_command_keeps_results_and_refuses_negative_days(tmp_path: Path) -> None:
    config = worker_config(tmp_path)
    uid, path = _received(config, StudyStatus.DONE, 10)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PNEUMO_")}
    env["PNEUMO_DATA_DIR"] = str(config.data_dir)

    bad = subprocess.run(
        [str(PNEUMO), "purge", "--older-than", "-1"], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and path.exists()
    done = subprocess.run(
        [str(PNEUMO), "purge", "--older-than", "7"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "purged 1 study(ies): 1 instance(s), 1 file(s) deleted" in done.stdout
    assert not path.exists()
    with session_scope(config.database_url) as session:
        assert session.execute(select(func.count()).select_from(Result)).scalar_one() == 1
        assert session.execute(select(func.count()).select_from(ImageResult)).scalar_one() == 1
        assert (
            session.execute(select(Study.status).where(Study.study_uid == uid)).scalar_one()
            is StudyStatus.DONE
        )


def test_a_refused_instance_file_and_an_unmarked_deletion_are_both_handled(tmp_path: Path) -> None:
    config = worker_config(tmp_path)
    owner_uid, owner_path = _received(config, StudyStatus.DONE, 40)
    with session_scope(config.database_url) as session:
        sop = session.execute(select(Instance.sop_instance_uid)).scalar_one()
    # Another study sent the same SOP Instance UID: spooled, but no row of its own.
    orphan_uid, orphan_path = _received(config, StudyStatus.DONE, 40, sop_uid=sop)
    owner_path.unlink()  # an earlier purge deleted it and stopped before marking the row

    report = purge_spool(config.database_url, config.data_dir / "spool", older_than_days=30)

    assert not orphan_path.exists()
    assert (report.files_deleted, report.instances_marked) == (1, 1)
    with session_scope(config.database_url) as session:
        assert repo.study_pixels_purged(session, owner_uid)
        assert not repo.study_pixels_purged(session, orphan_uid)  # it has no instance row
