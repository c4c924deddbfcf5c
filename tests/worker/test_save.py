"""Stage 7, save rows: selections, result and image rows in one go; a re-run replaces them."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from db.engine import session_scope
from db.models import ImageResult, Instance, ModelVersion, Result, ResultStatus, SelectionStatus
from tests.worker.studies import (
    CT,
    CXR,
    FakeInfo,
    FakePrediction,
    FakePredictor,
    predicted_study,
    record_study,
    worker_config,
)
from worker.intended_use import AgeEvidence
from worker.stages.assess import assess
from worker.stages.load import load_study
from worker.stages.outputs import build_outputs
from worker.stages.save import InstanceSelection, instance_selections, save_rows


def test_rows_for_a_study_and_idempotent_repeat(tmp_path: Path, dicom_data: Path) -> None:
    config = worker_config(tmp_path)
    study = record_study(config, [CXR, CT, CXR], age="006Y")
    loaded = load_study(config.database_url, study.study_id, study.revision)
    ids = [i.instance_id for i in loaded.instances]
    # The second chest image is judged out of distribution.
    verdicts = iter([FakePrediction(0.8), FakePrediction(0.8, ood_score=9.0, is_chest=False)])
    predicted = predicted_study(loaded, FakePredictor(verdict=lambda image: next(verdicts)))
    assessment = assess(predicted.predictions, AgeEvidence(), threshold=0.5, max_age_years=17)
    outputs = build_outputs(
        predicted, assessment, FakeInfo(), results_dir=config.results_dir, heatmap_max_side=64
    )

    assert instance_selections(predicted) == (
        InstanceSelection(ids[0], SelectionStatus.SELECTED, None),
        InstanceSelection(ids[1], SelectionStatus.SKIPPED, "modality:CT"),
        InstanceSelection(ids[2], SelectionStatus.SKIPPED, "not-chest-xray"),
    )
    timings = {"load": 0.5}
    result_id = save_rows(
        config.database_url, predicted, assessment, outputs, FakeInfo(), timings=timings
    )
    again = save_rows(
        config.database_url, predicted, assessment, outputs, FakeInfo(), timings=timings
    )
    assert again == result_id

    with session_scope(config.database_url) as session:
        skipped = {
            i.id: (i.selection, i.skip_reason) for i in session.execute(select(Instance)).scalars()
        }
        assert skipped[ids[1]] == (SelectionStatus.SKIPPED, "modality:CT")
        result = session.execute(select(Result)).scalar_one()
        assert result.status is ResultStatus.COMPLETE and result.ood
        assert result.flags == ["not-chest-xray"] and result.timings == {"load": 0.5}
        assert outputs.sr is not None and result.sr_path == str(outputs.sr.path)
        images = {r.instance_id: r for r in session.execute(select(ImageResult)).scalars()}
        assert set(images) == {ids[0], ids[2]}
        assert images[ids[0]].sc_path and images[ids[2]].sc_path is None
        assert not images[ids[2]].is_chest and images[ids[2]].ood_score == 9.0
        model = session.execute(select(ModelVersion)).scalar_one()
        assert (model.name, model.max_age_years) == ("fakenet", 17)
        assert session.execute(select(func.count()).select_from(ImageResult)).scalar_one() == 2
