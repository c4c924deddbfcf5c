"""Stage 5, build outputs: the SR and the heatmap SCs, in memory, with their final paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_io.sr import result_sr_uid
from tests.worker.studies import (
    CT,
    CXR,
    FakeInfo,
    FakePrediction,
    FakePredictor,
    loaded_study,
    predicted_study,
)
from worker.intended_use import AgeEvidence
from worker.stages.assess import assess
from worker.stages.outputs import algorithm_info, build_outputs
from worker.stages.predict import PredictedStudy
from worker.stages.timing import StageTimer


def _predicted(fake: FakePredictor) -> PredictedStudy:
    return predicted_study(loaded_study([CXR, CT]), fake)


def test_sr_and_one_heatmap_per_chest_image(tmp_path: Path, dicom_data: Path) -> None:
    predicted = _predicted(FakePredictor(verdict=lambda image: FakePrediction(0.8)))
    assessment = assess(predicted.predictions, AgeEvidence(), threshold=0.5, max_age_years=17)
    timer = StageTimer()

    outputs = build_outputs(
        predicted, assessment, FakeInfo(), results_dir=tmp_path, heatmap_max_side=256, timer=timer
    )

    study_uid = predicted.study.study_uid
    assert outputs.sr is not None
    sr_uid = result_sr_uid(study_uid, "0.0.1", 2)
    assert outputs.sr.path == tmp_path / study_uid / f"{sr_uid}.dcm"
    assert outputs.sr.sop_instance_uid == sr_uid
    assert outputs.sr.dataset.StudyInstanceUID == study_uid
    (heatmap,) = outputs.heatmaps
    assert heatmap.instance_id == 1 and outputs.heatmap_for(2) is None
    sc = heatmap.output.dataset
    assert max(int(sc.Rows), int(sc.Columns)) == 256  # scaled to the configured side
    assert heatmap.output.path == tmp_path / study_uid / f"{sc.SOPInstanceUID}.dcm"
    assert outputs.objects == (outputs.sr, heatmap.output)
    assert set(timer.seconds) == {"sr", "sc"}
    assert not any(o.path.exists() for o in outputs.objects)  # building writes nothing


def test_no_chest_image_no_sr_no_heatmap(tmp_path: Path, dicom_data: Path) -> None:
    fake = FakePredictor(verdict=lambda image: FakePrediction(0.8, is_chest=False))
    predicted = _predicted(fake)
    assessment = assess(predicted.predictions, AgeEvidence(), threshold=0.5, max_age_years=17)
    outputs = build_outputs(
        predicted, assessment, FakeInfo(), results_dir=tmp_path, heatmap_max_side=0
    )
    assert outputs.sr is None and outputs.heatmaps == () and outputs.objects == ()


def test_algorithm_info_names_the_model() -> None:
    info = algorithm_info(FakeInfo(threshold=0.25))
    assert (info.name, info.version, info.manufacturer) == ("fakenet", "0.0.1", "pneumo")
    assert info.parameters["threshold"] == "0.2500"
    assert info.parameters["intended_population"] == "test images"
    assert info.parameters["inference_precision"] == "float32"
    assert algorithm_info(FakeInfo(precision="bfloat16")).parameters["inference_precision"] == (
        "bfloat16"
    )


def test_invalid_study_uid_never_becomes_a_path(tmp_path: Path) -> None:
    from dicom_io.uids import InvalidUIDError
    from worker.stages.outputs import study_results_dir

    with pytest.raises(InvalidUIDError):
        study_results_dir(tmp_path, "../../etc")
