"""The listener callbacks: instances and studies recorded, work enqueued on the
right queue, and a broker failure raised (so the listener keeps the study)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path

import pydicom
import pytest
from celery import Celery
from kombu.exceptions import OperationalError
from pydicom.uid import generate_uid

from db import migrate
from db.engine import session_scope
from db.models import Instance, Study, StudyStatus
from dicom_io.assembly import ReadyStudy
from dicom_io.spool import SpooledInstance
from pneumo.settings import Settings
from tests.conftest import need_shared
from tests.paths import DICOM_DATA
from worker.app import create_app, queue_depths
from worker.config import WorkerConfig
from worker.intake import Intake

CXR = DICOM_DATA / "cxr" / "udacity_aihcnd_test2.dcm"


@pytest.fixture
def config(embedded_redis: Path) -> WorkerConfig:
    config = Settings(data_dir=embedded_redis).worker_config()
    migrate.upgrade(config.database_url)
    return config


def _spooled(tmp_path: Path) -> SpooledInstance:
    need_shared(CXR)
    ds = pydicom.dcmread(CXR)
    ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.AccessionNumber, ds.StudyDate = "ACC42", "20240102"
    path = tmp_path / "x.dcm"
    ds.save_as(path)
    return SpooledInstance(
        study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
        sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, path=path,
        size=path.stat().st_size, calling_aet="MOD", received_at=datetime.now(UTC),
    )  # fmt: skip


def test_ready_study_recorded_and_enqueued_realtime(config: WorkerConfig, tmp_path: Path) -> None:
    app = create_app(config)
    intake = Intake(config=config, app=app)
    instance = _spooled(tmp_path)
    intake.on_instance_stored(instance)
    intake.on_study_ready(ReadyStudy(instance.study_uid, (instance,), False, "quiet"))

    with session_scope(config.database_url) as session:
        study = session.query(Study).one()
        assert (study.status, study.revision) == (StudyStatus.QUEUED, 1)
        assert study.accession_number == "ACC42" and study.study_date == date(2024, 1, 2)
        assert study.patient_age == "58"  # as the file says, for the intended-use check
        assert session.query(Instance).count() == 1
    assert queue_depths(app) == {"realtime": 1, "batch": 0}

    intake.on_study_ready(ReadyStudy(instance.study_uid, (instance,), True, "quiet"))
    intake.reprocess(instance.study_uid)
    with session_scope(config.database_url) as session:
        assert session.query(Study).one().revision == 2
    assert queue_depths(app) == {"realtime": 2, "batch": 1}


def test_reprocess_of_an_unknown_study_is_refused(config: WorkerConfig) -> None:
    intake = Intake(config=config, app=create_app(config))
    with pytest.raises(LookupError):
        intake.reprocess(generate_uid())


def test_broker_failure_is_raised_not_swallowed(config: WorkerConfig, tmp_path: Path) -> None:
    broken = replace(config, broker_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    app: Celery = create_app(broken)
    app.conf.broker_connection_max_retries = 0
    app.conf.broker_transport_options = {"max_retries": 0}
    intake = Intake(config=broken, app=app)
    instance = _spooled(tmp_path)
    with pytest.raises(OperationalError):
        intake.on_study_ready(ReadyStudy(instance.study_uid, (instance,), False, "quiet"))
    with session_scope(config.database_url) as session:
        # Recorded before the publish: the listener's retry finds it again.
        assert session.query(Study).one().study_uid == instance.study_uid
