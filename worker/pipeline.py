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
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from db.engine import session_scope
from db.models import ResultStatus
from db.models_registry import ActiveModel, active_model
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
from worker.stages.load import PixelSource
from worker.stages.outputs import predecessor_sr

if TYPE_CHECKING:
    from model.precision import Precision

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
    """The model new work uses, loaded once per process and per activation.

    ``config.model_path`` set (``PNEUMO_MODEL_PATH``) pins this worker to that
    file. Otherwise the active model of the database
    (:func:`db.models_registry.active_model`, one primary-key query per call)
    is loaded from the file it was activated with, after checking that the
    file's sha256 is the one recorded; a new activation is picked up by the
    next study, without a restart. With no activation at all, the newest
    shipped weights are used. Each runs in ``config.inference_precision``
    (``PNEUMO_INFERENCE_PRECISION``, :mod:`model.precision`).

    Raises:
        model.inference.WeightsError: the weights file is missing, unreadable, or
            its sha256 is not the activated model version's.
        sqlalchemy.exc.SQLAlchemyError: the active model could not be read.
    """
    from model.inference import load_predictor  # torch: only where a model is needed

    precision = config.inference_precision
    if config.model_path is not None:
        return load_predictor(config.model_path, precision=precision)
    with session_scope(config.database_url) as session:
        active = active_model(session)
    if active is None:
        return load_predictor(None, precision=precision)
    key = (active.activation_id, precision.value)
    with _ACTIVE_LOCK:
        loaded = _ACTIVE.get(key)
        if loaded is None:
            loaded = _load_verified(active, precision)
            _ACTIVE.clear()  # one activated model per process: drop the one it replaces
            _ACTIVE[key] = loaded
        return loaded


_ACTIVE: dict[tuple[int, str], Predictor] = {}
"""The loaded active model, by (activation id, precision)."""
_ACTIVE_LOCK = threading.Lock()


def _load_verified(active: ActiveModel, precision: Precision) -> Predictor:
    """The activated weights file, loaded only if it hashes to the recorded sha256.

    Raises:
        model.inference.WeightsError: the file is missing, unreadable or another file.
    """
    from model.inference import Predictor as ModelPredictor
    from model.inference import WeightsError, load_predictor, sha256_file

    path = Path(active.path)

    def refuse(actual: str) -> WeightsError:
        return WeightsError(
            f"weights file {path.name} has sha256 {actual[:16]}, not {active.sha256[:16]} "
            f"recorded for the active model {active.label}: refusing to load it "
            "(activate the intended file again with `pneumo models activate`)"
        )

    try:
        actual = sha256_file(path)
    except OSError as exc:
        raise WeightsError(
            f"weights file of the active model {active.label} unreadable: {path.name} "
            f"({type(exc).__name__})"
        ) from exc
    if actual != active.sha256:
        raise refuse(actual)
    predictor: Predictor = load_predictor(path, precision=precision)
    if predictor.info.sha256 != active.sha256:  # cached from before the file was replaced
        predictor = ModelPredictor(path, precision=precision)
        if predictor.info.sha256 != active.sha256:  # replaced again while we read it
            raise refuse(predictor.info.sha256)
    log.info("model %s loaded from %s (activation %d)", active.label, path.name,
             active.activation_id)  # fmt: skip
    return predictor


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
        loaded = load_study(
            config.database_url, study_id, revision, source=PixelSource.from_config(config)
        )
    read = select_and_read(loaded, max_pixels_bits=config.max_image_pixels_bits, timer=timer)
    (predicted,) = predict(
        predictor,
        [read],
        batch_size=config.batch_size,
        timer=timer,
        heatmap_max_side=config.heatmap_max_side,
    )
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
        predecessor=predecessor_sr(config.database_url, study_id, revision),
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
