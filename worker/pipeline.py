"""One study through the model, as the named stages of :mod:`worker.stages` composed.

load → select and read → predict → assess → build outputs → write files →
save rows. Delivery is :mod:`worker.delivery`.

Celery-free, so it can be run and tested directly; :mod:`worker.tasks` wraps
it with retries, job rows and dead-lettering. Every stage is timed and the
timings are stored on the result row.

Idempotent: the result row is keyed on (study, model version, revision) and
the SR/SC UIDs are derived from the same values, so running a study twice (a
redelivered task) replaces files and rows instead of duplicating them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from db.models import ResultStatus
from worker.config import WorkerConfig
from worker.flags import ResultFlag
from worker.intended_use import AgeEvidence, intended_max_age
from worker.predictor import Predictor
from worker.stages import (
    StageTimer,
    assess,
    build_outputs,
    load_study,
    predict,
    save_rows,
    select_and_read,
    write_files,
)

__all__ = ["StageTimer", "StudyOutcome", "default_predictor", "run_study"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyOutcome:
    """What :func:`run_study` produced (ids and paths, nothing heavy)."""

    study_id: int
    study_uid: str
    revision: int
    result_id: int
    status: ResultStatus
    probability: float | None
    finding: bool | None
    flags: tuple[ResultFlag, ...]
    files: tuple[Path, ...]
    """SR first, then the SCs."""
    timings: dict[str, float] = field(default_factory=dict)


def default_predictor(config: WorkerConfig) -> Predictor:
    """The process-wide model for ``config.model_path`` (loaded once per process).

    Raises:
        model.inference.WeightsError: the weights file is missing or unreadable.
    """
    from model.inference import load_predictor  # torch: only where a model is needed

    return load_predictor(config.model_path)


def run_study(
    config: WorkerConfig,
    study_id: int,
    revision: int,
    *,
    predictor: Predictor | None = None,
    timer: StageTimer | None = None,
) -> StudyOutcome:
    """Run the model on every selected image of a study and store the result and files.

    ``predictor`` None uses :func:`default_predictor` (timed as ``load_model``).

    Raises:
        LookupError: no study row has ``study_id``.
        dicom_io.uids.InvalidUIDError: the stored Study Instance UID is not a valid UID.
        model.inference.WeightsError: the model cannot be loaded.
        OSError: a result file cannot be written.
        ValueError: an SR or SC cannot be built, or the predictor miscounts its outputs.
        sqlalchemy.exc.SQLAlchemyError: the database failed.
    """
    timer = timer or StageTimer()
    if predictor is None:
        with timer.stage("load_model"):
            predictor = default_predictor(config)
    info = predictor.info
    with timer.stage("load"):
        loaded = load_study(config.database_url, study_id, revision)
    read = select_and_read(loaded, max_pixels_bits=config.max_image_pixels_bits, timer=timer)
    (predicted,) = predict(predictor, [read], batch_size=config.batch_size, timer=timer)
    assessment = assess(
        predicted.predictions,
        AgeEvidence.from_dataset(loaded.first_dataset),
        threshold=float(info.threshold),
        max_age_years=intended_max_age(info.max_age_years, config.intended_max_age_years),
    )
    outputs = build_outputs(
        predicted,
        assessment,
        info,
        results_dir=config.results_dir,
        heatmap_max_side=config.heatmap_max_side,
        timer=timer,
    )
    with timer.stage("write_files"):
        files = write_files(outputs)
    with timer.stage("db"):
        result_id = save_rows(
            config.database_url, predicted, assessment, outputs, info, timings=timer.seconds
        )
    log.info(
        "study %s rev %d: %d instance(s), %d usable, status %s, flags %s",
        loaded.study_uid,
        revision,
        len(loaded.instances),
        len(predicted.images),
        assessment.status.value,
        ",".join(assessment.flags) or "-",
    )
    return StudyOutcome(
        study_id=study_id,
        study_uid=loaded.study_uid,
        revision=revision,
        result_id=result_id,
        status=assessment.status,
        probability=assessment.probability,
        finding=assessment.finding,
        flags=assessment.flags,
        files=files,
        timings=dict(timer.seconds),
    )
