"""Stage 7, save rows: model version, instance selections, result and image results.

One transaction, through :mod:`db.repository` only. Every write is an upsert
on a natural key, so a redelivered task replaces its rows instead of adding
new ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from db import repository as repo
from db.engine import session_scope
from db.models import SelectionStatus
from dicom_io.selection import SkipReason
from worker.flags import ResultFlag
from worker.predictor import ModelDescription
from worker.stages.assess import Assessment
from worker.stages.outputs import StudyOutputs
from worker.stages.predict import PredictedImage, PredictedStudy

__all__ = ["InstanceSelection", "image_outcome", "instance_selections", "save_rows"]


_NOT_CHEST = ResultFlag.NOT_CHEST.value


@dataclass(frozen=True)
class InstanceSelection:
    """What the run decided for one instance (``instance.selection`` / ``skip_reason``)."""

    instance_id: int
    selection: SelectionStatus
    skip_reason: str | None


def instance_selections(predicted: PredictedStudy) -> tuple[InstanceSelection, ...]:
    """Selected, or skipped with its reason, for every instance of the study.

    An image the model read but judged out of distribution is skipped with the
    one not-a-chest code (:attr:`ResultFlag.NOT_CHEST`, i.e.
    ``model.inference.NOT_CHEST_CODE``): it is not used for the finding (its
    scores stay in ``image_result``).
    """
    chest = {image.instance.instance_id for image in predicted.chest}
    out = []
    for item in predicted.read.instances:
        if item.image is None:
            reason = str(item.skip_reason or SkipReason.UNREADABLE)
            out.append(InstanceSelection(item.instance_id, SelectionStatus.SKIPPED, reason))
        elif item.instance_id not in chest:
            out.append(InstanceSelection(item.instance_id, SelectionStatus.SKIPPED, _NOT_CHEST))
        else:
            out.append(InstanceSelection(item.instance_id, SelectionStatus.SELECTED, None))
    return tuple(out)


def image_outcome(image: PredictedImage, outputs: StudyOutputs) -> repo.ImageOutcome:
    """The ``image_result`` row of one read image (with its heatmap SC, if any)."""
    sc = outputs.heatmap_for(image.instance.instance_id)
    p = image.prediction
    return repo.ImageOutcome(
        instance_id=image.instance.instance_id,
        probability=float(p.probability),
        ood_score=float(p.ood_score),
        is_chest=bool(p.is_chest),
        finding=bool(p.finding),
        sc_sop_instance_uid=sc.sop_instance_uid if sc else None,
        sc_path=str(sc.path) if sc else None,
    )


def _result_record(
    predicted: PredictedStudy,
    assessment: Assessment,
    outputs: StudyOutputs,
    model_version_id: int,
    timings: Mapping[str, float],
) -> repo.ResultRecord:
    sr = outputs.sr
    return repo.ResultRecord(
        study_id=predicted.study.study_id,
        model_version_id=model_version_id,
        revision=predicted.study.revision,
        status=assessment.status,
        probability=assessment.probability,
        finding=assessment.finding,
        threshold=assessment.threshold,
        ood=assessment.ood,
        outside_intended_use=assessment.outside_intended_use,
        flags=tuple(flag.value for flag in assessment.flags),
        summary=assessment.summary,
        sr_sop_instance_uid=sr.sop_instance_uid if sr is not None else None,
        sr_path=str(sr.path) if sr is not None else None,
        timings=dict(timings),
    )


def save_rows(
    database_url: str,
    predicted: PredictedStudy,
    assessment: Assessment,
    outputs: StudyOutputs,
    info: ModelDescription,
    *,
    timings: Mapping[str, float],
) -> int:
    """Store the result of one study revision in one transaction; return the result id.

    Call after :func:`worker.stages.write.write_files`: the rows name those files.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database refused a write (nothing is committed).
    """
    with session_scope(database_url) as session:
        model_version_id = repo.ensure_model_version(
            session,
            name=str(info.name),
            version=str(info.version),
            sha256=str(info.sha256),
            threshold=assessment.threshold,
            intended_population=str(info.intended_population),
            max_age_years=assessment.max_age_years,
        )
        for chosen in instance_selections(predicted):
            repo.set_instance_selection(
                session, chosen.instance_id, chosen.selection, chosen.skip_reason
            )
        record = _result_record(predicted, assessment, outputs, model_version_id, timings)
        images = [image_outcome(image, outputs) for image in predicted.images]
        return repo.save_result(session, record, images)
