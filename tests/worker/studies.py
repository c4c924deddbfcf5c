"""Builders shared by the pipeline stage tests (not fixtures: plain functions and fakes).

A :class:`WorkerConfig` on a fresh SQLite file, real DICOM files recorded as
one new study the way the listener records them, and a fake predictor that
counts its calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.uid import generate_uid

from db import migrate
from db import repository as repo
from db.engine import session_scope
from tests.paths import DICOM_DATA
from worker.config import WorkerConfig
from worker.intended_use import AgeEvidence
from worker.predictor import Image
from worker.stages.assess import assess
from worker.stages.load import LoadedInstance, LoadedStudy
from worker.stages.outputs import StudyOutputs, build_outputs
from worker.stages.predict import PredictedStudy, predict
from worker.stages.read import select_and_read

__all__ = [
    "CT",
    "CXR",
    "FakeInfo",
    "FakePrediction",
    "FakePredictor",
    "RecordedStudy",
    "loaded_study",
    "predicted_study",
    "record_study",
    "study_outputs",
    "worker_config",
]

CXR = DICOM_DATA / "cxr" / "udacity_aihcnd_test1.dcm"
"""A frontal chest radiograph (the model reads it as a chest X-ray)."""
CT = DICOM_DATA / "other" / "CT_small.dcm"
"""A CT slice: skipped by selection (``modality:CT``)."""


def worker_config(tmp_path: Path, **overrides: object) -> WorkerConfig:
    """A config whose database (SQLite, migrated) and results live under ``tmp_path``."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{data_dir / 'pneumo.db'}"
    migrate.upgrade(url)
    values: dict[str, object] = {
        "database_url": url,
        "broker_url": "redis://127.0.0.1:6379/15",  # never contacted by these tests
        "data_dir": data_dir,
        "results_dir": data_dir / "results",
    }
    values.update(overrides)
    return WorkerConfig(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RecordedStudy:
    study_id: int
    revision: int
    study_uid: str
    paths: tuple[Path, ...]


def record_study(
    config: WorkerConfig, sources: Sequence[Path], *, age: str | None = None
) -> RecordedStudy:
    """Copy ``sources`` into one new study (fresh UIDs) and record them like the listener."""
    study_uid = generate_uid()
    paths = []
    with session_scope(config.database_url) as session:
        for source in sources:
            ds = pydicom.dcmread(source)
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = generate_uid()
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            if age is not None:
                ds.PatientAge = age
            path = config.data_dir / "spool" / study_uid / f"{ds.SOPInstanceUID}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path)
            paths.append(path)
            repo.record_instance(
                session,
                repo.InstanceRecord(
                    study_uid=study_uid,
                    series_uid=ds.SeriesInstanceUID,
                    sop_instance_uid=ds.SOPInstanceUID,
                    sop_class_uid=ds.SOPClassUID,
                    transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                    path=str(path),
                    size=path.stat().st_size,
                    calling_aet="TEST",
                    received_at=datetime.now(UTC),
                ),
            )
        study_id, revision = repo.mark_study_queued(session, study_uid, amended=False)
    return RecordedStudy(study_id, revision, study_uid, tuple(paths))


@dataclass(frozen=True)
class FakeInfo:
    name: str = "fakenet"
    version: str = "0.0.1"
    sha256: str = "0" * 64
    threshold: float = 0.5
    intended_population: str = "test images"
    max_age_years: int | None = 17
    precision: str = "float32"


@dataclass(frozen=True)
class FakePrediction:
    probability: float
    ood_score: float = 0.0
    is_chest: bool = True
    threshold: float = 0.5

    @property
    def finding(self) -> bool:
        return self.is_chest and self.probability >= self.threshold


def _mean_probability(image: Image) -> FakePrediction:
    return FakePrediction(probability=float(np.clip(image.mean(), 0.0, 1.0)))


@dataclass
class FakePredictor:
    """A predictor whose verdict is ``verdict(image)``; it records each call's batch size."""

    verdict: Callable[[Image], FakePrediction] = _mean_probability
    info: FakeInfo = field(default_factory=FakeInfo)
    predict_calls: list[int] = field(default_factory=list)
    heatmap_calls: list[int] = field(default_factory=list)

    def predict(self, images: Sequence[Image]) -> list[FakePrediction]:
        self.predict_calls.append(len(images))
        return [self.verdict(image) for image in images]

    def heatmaps(self, images: Sequence[Image]) -> list[npt.NDArray[np.float32]]:
        self.heatmap_calls.append(len(images))
        return [np.full(np.asarray(image).shape, 0.5, dtype=np.float32) for image in images]


def loaded_study(sources: Sequence[Path], *, study_id: int = 7, revision: int = 2) -> LoadedStudy:
    """``sources`` parsed as one study (the first file's Study Instance UID), ids 1, 2, ..."""
    datasets = [pydicom.dcmread(source) for source in sources]
    study_uid = str(datasets[0].StudyInstanceUID)
    instances = []
    for n, ds in enumerate(datasets, start=1):
        ds.StudyInstanceUID = study_uid
        instances.append(LoadedInstance(n, str(ds.SOPInstanceUID), ds))
    return LoadedStudy(study_id, study_uid, revision, tuple(instances))


def predicted_study(study: LoadedStudy, predictor: FakePredictor) -> PredictedStudy:
    """``study`` selected, read and predicted by ``predictor``."""
    (predicted,) = predict(predictor, [select_and_read(study, max_pixels_bits=2**31)])
    return predicted


def study_outputs(
    sources: Sequence[Path], results_dir: Path, *, heatmap_max_side: int = 0
) -> StudyOutputs:
    """The SR and SCs of ``sources`` as one study, every image a chest X-ray at 0.8."""
    fake = FakePredictor(verdict=lambda image: FakePrediction(0.8))
    predicted = predicted_study(loaded_study(sources), fake)
    assessment = assess(predicted.predictions, AgeEvidence(), threshold=0.5, max_age_years=17)
    return build_outputs(
        predicted,
        assessment,
        FakeInfo(),
        results_dir=results_dir,
        heatmap_max_side=heatmap_max_side,
    )
