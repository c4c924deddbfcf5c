"""The listener callbacks: instances and studies recorded, work enqueued on the
right queue, and a broker failure raised (so the listener keeps the study)."""

from __future__ import annotations

import socket
import time
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path

import pydicom
import pytest
from celery import Celery
from kombu.exceptions import OperationalError
from pydicom.uid import generate_uid
from sqlalchemy.exc import SQLAlchemyError

from db import migrate
from db.engine import CONNECT_TIMEOUT_SECONDS, session_scope
from db.models import Instance, Study, StudyStatus
from dicom_io.assembly import ReadyStudy
from dicom_io.spool import SpooledInstance
from pneumo.settings import Settings
from tests.conftest import need_shared
from tests.db.postgres import throwaway_database
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
    tmp_path.mkdir(parents=True, exist_ok=True)
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


@pytest.mark.postgres
def test_nul_and_overlong_ids_are_cleaned_and_the_study_queued_on_postgres(
    embedded_redis: Path, postgres_url: str, tmp_path: Path
) -> None:
    # PostgreSQL refuses NUL in text: unsanitised, the listener's retry would
    # fail the same way for ever and the study would never be queued.
    with throwaway_database(postgres_url) as pg:
        config = Settings(data_dir=embedded_redis, database_url=pg).worker_config()
        migrate.upgrade(config.database_url)
        instance = _spooled(tmp_path)
        ds = pydicom.dcmread(instance.path)
        ds.PatientID = "PID\x00" + "7" * 80
        ds.AccessionNumber = "A\x00CC" + "9" * 30
        ds.StudyDate = "1980-01-02"  # not a DA
        ds.save_as(instance.path)
        intake = Intake(config=config, app=create_app(config))
        intake.on_instance_stored(instance)
        intake.on_study_ready(ReadyStudy(instance.study_uid, (instance,), False, "quiet"))
        with session_scope(config.database_url) as session:
            study = session.query(Study).one()
            assert study.status is StudyStatus.QUEUED
            assert study.patient_id == ("PID" + "7" * 80)[:64]
            assert study.accession_number == ("ACC" + "9" * 30)[:16]
            assert study.study_date is None


def test_sop_uid_of_another_study_is_refused_and_the_first_keeps_it(
    config: WorkerConfig, tmp_path: Path
) -> None:
    intake = Intake(config=config, app=create_app(config))
    first = _spooled(tmp_path / "a")
    reused = replace(first, study_uid=generate_uid(), path=tmp_path / "b.dcm")
    reused.path.write_bytes(first.path.read_bytes())
    intake.on_study_ready(ReadyStudy(first.study_uid, (first,), False, "quiet"))
    intake.on_instance_stored(reused)
    intake.on_study_ready(ReadyStudy(reused.study_uid, (reused,), False, "quiet"))  # no raise
    with session_scope(config.database_url) as session:
        studies = {s.study_uid: s for s in session.query(Study)}
        assert [i.path for i in studies[first.study_uid].instances] == [str(first.path)]
        assert studies[reused.study_uid].instances == []
        assert studies[reused.study_uid].status is StudyStatus.QUEUED  # ends no-usable-image


def test_a_database_outage_costs_one_connect_timeout_not_one_per_c_store(
    config: WorkerConfig, tmp_path: Path
) -> None:
    # A database host that accepts TCP and never answers (the slowest outage).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"postgresql+psycopg://nobody@127.0.0.1:{silent.getsockname()[1]}/x"
        intake = Intake(config=replace(config, database_url=url), app=create_app(config))
        instance = _spooled(tmp_path)
        started = time.monotonic()
        with pytest.raises(SQLAlchemyError):
            intake.on_instance_stored(instance)  # the listener logs it, still answers Success
        first = time.monotonic() - started
        started = time.monotonic()
        for _ in range(5):
            intake.on_instance_stored(instance)  # skipped: on_study_ready records them later
        rest = time.monotonic() - started
    assert first < CONNECT_TIMEOUT_SECONDS + 5 and rest < 0.5
