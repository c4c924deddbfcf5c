"""The listener callbacks: instances and studies recorded, work enqueued on the
right queue, and a broker failure raised (so the listener keeps the study)."""

from __future__ import annotations

from datetime import date, datetime, timezone
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from db import migrate
from db.engine import session_scope
from db.models import Instance, Study, StudyStatus
from dicom_io.assembly import ReadyStudy
from dicom_io.spool import SpooledInstance
from pneumo.commands.pipeline import queue_depths
from pneumo.settings import Settings
from worker.app import QUEUES, create_app
from worker.intake import Intake

REPO = Path(__file__).resolve().parents[2]
CXR = REPO.parent / "shared" / "data" / "dicom" / "cxr" / "udacity_aihcnd_test2.dcm"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(data_dir=tmp_path / "data")
    migrate.upgrade(s.effective_database_url)
    return s


def _spooled(tmp_path: Path) -> SpooledInstance:
    if not CXR.exists():
        pytest.skip("shared data not available")
    ds = pydicom.dcmread(CXR)
    ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.AccessionNumber, ds.StudyDate = "ACC42", "20240102"
    path = tmp_path / "x.dcm"
    ds.save_as(path)
    return SpooledInstance(
        study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
        sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, path=path,
        size=path.stat().st_size, calling_aet="MOD", received_at=datetime.now(timezone.utc),
    )


def test_ready_study_recorded_and_enqueued_realtime(settings: Settings, tmp_path: Path) -> None:
    app = create_app(settings)
    intake = Intake(settings=settings, app=app)
    instance = _spooled(tmp_path)
    intake.on_instance_stored(instance)
    intake.on_study_ready(ReadyStudy(instance.study_uid, (instance,), False, "quiet"))

    with session_scope(settings.effective_database_url) as session:
        study = session.query(Study).one()
        assert (study.status, study.revision) == (StudyStatus.QUEUED, 1)
        assert study.accession_number == "ACC42" and study.study_date == date(2024, 1, 2)
        assert study.patient_age == "58"  # as the file says, for the intended-use check
        assert session.query(Instance).count() == 1
    assert queue_depths(app, QUEUES) == {"realtime": 1, "batch": 0}

    intake.on_study_ready(ReadyStudy(instance.study_uid, (instance,), True, "quiet"))
    intake.reprocess(instance.study_uid)
    with session_scope(settings.effective_database_url) as session:
        assert session.query(Study).one().revision == 2
    assert queue_depths(app, QUEUES) == {"realtime": 2, "batch": 1}


def test_broker_failure_is_raised_not_swallowed(settings: Settings, tmp_path: Path) -> None:
    broken = Settings(data_dir=settings.data_dir,
                      broker_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    app = create_app(broken)
    app.conf.broker_connection_max_retries = 0
    app.conf.broker_transport_options = {"max_retries": 0}
    intake = Intake(settings=broken, app=app)
    instance = _spooled(tmp_path)
    with pytest.raises(Exception):
        intake.on_study_ready(ReadyStudy(instance.study_uid, (instance,), False, "quiet"))
    with session_scope(settings.effective_database_url) as session:
        # Recorded before the publish: the listener's retry finds it again.
        assert session.query(Study).one().study_uid == instance.study_uid
