"""The pipeline on real DICOM files with the real model (in-process, no broker):
selection reasons, probabilities equal to the model's own, SR + SC files,
idempotent re-runs, intended-use flag, and a study with nothing usable."""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from db import migrate, repository as repo
from db.engine import session_scope
from db.models import ImageResult, Instance, Result, ResultStatus, SelectionStatus
from pneumo.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
CXR = SHARED / "dicom" / "cxr" / "udacity_aihcnd_test1.dcm"
CT = SHARED / "dicom" / "other" / "CT_small.dcm"


@pytest.fixture(scope="module")
def predictor():  # type: ignore[no-untyped-def]
    inference = pytest.importorskip("model.inference")
    try:
        return inference.load_predictor()
    except inference.WeightsError:
        pytest.skip("no model weights yet")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    if not CXR.exists() or not CT.exists():
        pytest.skip("shared data not available")
    s = Settings(data_dir=tmp_path / "data")
    migrate.upgrade(s.effective_database_url)
    return s


def _study(settings: Settings, sources: list[Path], age: str | None) -> tuple[int, int, list[Path]]:
    """Copy real files into one new study (fresh UIDs), record them like the listener does."""
    study_uid = generate_uid()
    paths = []
    with session_scope(settings.effective_database_url) as session:
        for source in sources:
            ds = pydicom.dcmread(source)
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = generate_uid()
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            if age is not None:
                ds.PatientAge = age
            path = settings.spool_dir / study_uid / f"{ds.SOPInstanceUID}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path)
            paths.append(path)
            repo.record_instance(session, repo.InstanceRecord(
                study_uid=study_uid, series_uid=ds.SeriesInstanceUID,
                sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, path=str(path),
                size=path.stat().st_size, calling_aet="TEST",
                received_at=datetime.now(timezone.utc)))
        study_id, revision = repo.mark_study_queued(session, study_uid, amended=False)
    return study_id, revision, paths


def test_study_with_chest_and_ct(settings: Settings, predictor) -> None:  # type: ignore[no-untyped-def]
    from dicom_io.pixels import read_pixels
    from worker.pipeline import run_study

    study_id, revision, (cxr_path, ct_path) = _study(settings, [CXR, CT], age="045Y")
    outcome = run_study(settings, study_id, revision, predictor=predictor)

    expected = predictor.predict([read_pixels(pydicom.dcmread(cxr_path))])[0]
    assert expected.is_chest, "the real chest X-ray should pass the OOD check"
    assert outcome.status is ResultStatus.COMPLETE
    assert outcome.probability == pytest.approx(expected.probability, abs=1e-5)
    assert "outside-intended-use" in outcome.flags  # adult (45 years)
    for stage in ("load", "select", "read_pixels", "inference", "heatmaps", "sr", "db"):
        assert stage in outcome.timings

    with session_scope(settings.effective_database_url) as session:
        instances = {i.path: i for i in session.execute(select(Instance)).scalars()}
        assert instances[str(cxr_path)].selection is SelectionStatus.SELECTED
        ct = instances[str(ct_path)]
        assert ct.selection is SelectionStatus.SKIPPED and ct.skip_reason == "modality:CT"
        result = session.execute(select(Result)).scalar_one()
        assert result.outside_intended_use and result.sr_path
        assert result.timings["inference"] > 0

    sr_path, sc_path = outcome.files
    sr = pydicom.dcmread(sr_path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == outcome.study_uid
    dump = subprocess.run(["/usr/bin/dsrdump", str(sr_path)], capture_output=True, text=True,
                          env={"TCP_NODELAY": "1"}).stdout
    assert "outside-intended-use" in dump
    assert pydicom.dcmread(sc_path).SOPClassUID.startswith("1.2.840.10008.5.1.4.1.1.7")
    assert sc_path.parent == settings.results_dir / outcome.study_uid

    # A redelivered task runs again: same rows, same files, no duplicates.
    again = run_study(settings, study_id, revision, predictor=predictor)
    assert again.result_id == outcome.result_id
    assert [p.name for p in again.files] == [p.name for p in outcome.files]
    with session_scope(settings.effective_database_url) as session:
        assert session.execute(select(func.count()).select_from(Result)).scalar_one() == 1
        assert session.execute(select(func.count()).select_from(ImageResult)).scalar_one() == 1


def test_child_is_inside_intended_use(settings: Settings, predictor) -> None:  # type: ignore[no-untyped-def]
    from worker.pipeline import run_study

    study_id, revision, _ = _study(settings, [CXR], age="006Y")
    outcome = run_study(settings, study_id, revision, predictor=predictor)
    assert "outside-intended-use" not in outcome.flags


def test_study_with_nothing_usable(settings: Settings, predictor) -> None:  # type: ignore[no-untyped-def]
    from worker.pipeline import run_study

    study_id, revision, _ = _study(settings, [CT], age=None)
    outcome = run_study(settings, study_id, revision, predictor=predictor)
    assert outcome.status is ResultStatus.NO_USABLE_IMAGE
    assert outcome.probability is None and outcome.finding is None
    assert outcome.files == ()
    assert "no-usable-image" in outcome.flags
    with session_scope(settings.effective_database_url) as session:
        result = session.execute(select(Result)).scalar_one()
        assert result.probability is None and result.sr_path is None
