"""The pipeline on real DICOM files with the real model (in-process, no broker):
selection reasons, probabilities equal to the model's own, SR + SC files,
idempotent re-runs, intended-use flag, and a study with nothing usable."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from db.engine import session_scope
from db.models import ImageResult, Instance, Result, ResultStatus, SelectionStatus
from model.inference import NOT_CHEST_CODE
from tests.conftest import need_dcmtk
from tests.worker.studies import CT, CXR, FakePrediction, FakePredictor, record_study, worker_config
from worker.config import WorkerConfig
from worker.flags import ResultFlag
from worker.pipeline import StageTimer, run_study

STAGES = ("load", "select", "read_pixels", "inference", "heatmaps", "sr", "sc", "write_files", "db")


@pytest.fixture(scope="module")
def predictor():  # type: ignore[no-untyped-def]
    inference = pytest.importorskip("model.inference")
    try:
        return inference.load_predictor()
    except inference.WeightsError:
        pytest.skip("no model weights yet")


def _dsrdump(path: Path) -> str:
    """DCMTK's text rendering of an SR file."""
    return subprocess.run(
        ["/usr/bin/dsrdump", str(path)],
        capture_output=True,
        text=True,
        env={"TCP_NODELAY": "1"},
    ).stdout


@pytest.fixture
def config(tmp_path: Path, dicom_data: Path) -> WorkerConfig:
    return worker_config(tmp_path)


def test_study_with_chest_and_ct(config: WorkerConfig, predictor) -> None:  # type: ignore[no-untyped-def]
    from dicom_io.pixels import read_pixels

    need_dcmtk("dsrdump")
    study = record_study(config, [CXR, CT], age="045Y")
    cxr_path, ct_path = study.paths
    outcome = run_study(config, study.study_id, study.revision, predictor=predictor)

    expected = predictor.predict([read_pixels(pydicom.dcmread(cxr_path))])[0]
    assert expected.is_chest, "the real chest X-ray should pass the OOD check"
    assert outcome.status is ResultStatus.COMPLETE
    assert outcome.probability == pytest.approx(expected.probability, abs=1e-5)
    assert "outside-intended-use" in outcome.flags  # adult (45 years)
    for stage in STAGES:
        assert stage in outcome.timings

    with session_scope(config.database_url) as session:
        instances = {i.path: i for i in session.execute(select(Instance)).scalars()}
        assert instances[str(cxr_path)].selection is SelectionStatus.SELECTED
        ct = instances[str(ct_path)]
        assert ct.selection is SelectionStatus.SKIPPED and ct.skip_reason == "modality:CT"
        result = session.execute(select(Result)).scalar_one()
        assert result.outside_intended_use and result.sr_path
        assert result.timings["inference"] > 0
        assert result.flags == ["outside-intended-use"]

    sr_path, sc_path = outcome.files
    sr = pydicom.dcmread(sr_path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == outcome.study_uid
    dump = _dsrdump(sr_path)
    assert "outside-intended-use" in dump
    assert "inference_precision=float32" in dump  # the precision the result was computed in
    assert pydicom.dcmread(sc_path).SOPClassUID.startswith("1.2.840.10008.5.1.4.1.1.7")
    assert sc_path.parent == config.results_dir / outcome.study_uid

    # A redelivered task runs again: same rows, same files, no duplicates.
    again = run_study(config, study.study_id, study.revision, predictor=predictor)
    assert again.result_id == outcome.result_id
    assert [p.name for p in again.files] == [p.name for p in outcome.files]
    with session_scope(config.database_url) as session:
        assert session.execute(select(func.count()).select_from(Result)).scalar_one() == 1
        assert session.execute(select(func.count()).select_from(ImageResult)).scalar_one() == 1


def test_inference_precision_setting_reaches_the_model_and_the_sr(
    tmp_path: Path,
    dicom_data: Path,
    predictor,  # type: ignore[no-untyped-def]
) -> None:
    """PNEUMO_INFERENCE_PRECISION=bfloat16: the default predictor runs in it, the SR says so."""
    from worker.pipeline import default_predictor

    need_dcmtk("dsrdump")
    config = worker_config(tmp_path, inference_precision="bfloat16")
    fast = default_predictor(config)  # no activated model: the shipped weights, in bfloat16
    assert fast.info.precision == "bfloat16" and fast is not predictor
    assert default_predictor(config) is fast  # loaded once per process

    study = record_study(config, [CXR], age="006Y")
    outcome = run_study(config, study.study_id, study.revision)  # the default predictor
    plain = run_study(config, study.study_id, study.revision, predictor=predictor)
    assert outcome.probability is not None and plain.probability is not None
    assert outcome.probability == pytest.approx(plain.probability, abs=5e-3)
    assert outcome.finding == plain.finding
    # the same result, rewritten by float32, then by bfloat16 again
    assert "inference_precision=float32" in _dsrdump(plain.files[0])
    run_study(config, study.study_id, study.revision)
    assert "inference_precision=bfloat16" in _dsrdump(outcome.files[0])


def test_child_is_inside_intended_use(config: WorkerConfig, predictor) -> None:  # type: ignore[no-untyped-def]
    study = record_study(config, [CXR], age="006Y")
    outcome = run_study(config, study.study_id, study.revision, predictor=predictor)
    assert "outside-intended-use" not in outcome.flags


def test_study_with_nothing_usable(config: WorkerConfig, predictor) -> None:  # type: ignore[no-untyped-def]
    study = record_study(config, [CT])
    outcome = run_study(config, study.study_id, study.revision, predictor=predictor)
    assert outcome.status is ResultStatus.NO_USABLE_IMAGE
    assert outcome.probability is None and outcome.finding is None
    assert outcome.files == ()
    assert "no-usable-image" in outcome.flags
    with session_scope(config.database_url) as session:
        result = session.execute(select(Result)).scalar_one()
        assert result.probability is None and result.sr_path is None


def test_image_the_guard_rejects_is_skipped_with_the_not_chest_code(
    config: WorkerConfig,
) -> None:
    fake = FakePredictor(verdict=lambda image: FakePrediction(0.9, ood_score=9.0, is_chest=False))
    study = record_study(config, [CXR], age="006Y")
    timer = StageTimer()
    outcome = run_study(config, study.study_id, study.revision, predictor=fake, timer=timer)

    assert outcome.flags == (ResultFlag.NOT_CHEST, ResultFlag.NO_USABLE_IMAGE)
    assert outcome.status is ResultStatus.NO_USABLE_IMAGE and outcome.files == ()
    assert fake.predict_calls == [1] and fake.heatmap_calls == []
    assert "load_model" not in outcome.timings and outcome.timings == timer.seconds
    with session_scope(config.database_url) as session:
        instance = session.execute(select(Instance)).scalar_one()
        assert instance.selection is SelectionStatus.SKIPPED
        assert instance.skip_reason == NOT_CHEST_CODE == "not-chest-xray"
        result = session.execute(select(Result)).scalar_one()
        assert result.ood and result.flags == ["not-chest-xray", "no-usable-image"]
        image = session.execute(select(ImageResult)).scalar_one()
        assert not image.is_chest and image.sc_path is None


def test_unknown_study_raises_lookup_error(config: WorkerConfig) -> None:
    with pytest.raises(LookupError):
        run_study(config, 12345, 1, predictor=FakePredictor())
