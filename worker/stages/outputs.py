"""Stage 5, build outputs: the result SR and one heatmap Secondary Capture per chest image.

Objects are built in memory with their final paths; nothing is written here
(:mod:`worker.stages.write` does that). UIDs are derived from (study, model
version, revision), so a re-run builds the same objects under the same names.

The SR of a reprocessed study names the SR of the revision before it
(:func:`predecessor_sr`, read before the stage runs): from that SR's file when
it is still on disk, else from the UIDs its result row recorded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from db import repository as repo
from db.engine import session_scope
from dicom_io.part10 import read_header
from dicom_io.sc import build_heatmap_sc, capture_shape
from dicom_io.sr import (
    AlgorithmInfo,
    ImageFinding,
    SRReference,
    build_result_sr,
    result_sr_reference,
    result_sr_uid,
)
from dicom_io.uids import is_valid_uid, require_uid
from worker.predictor import Image, ModelDescription
from worker.stages.assess import Assessment
from worker.stages.predict import PredictedImage, PredictedStudy
from worker.stages.timing import StageTimer, timed

__all__ = [
    "HeatmapOutput",
    "OutputObject",
    "StudyOutputs",
    "algorithm_info",
    "build_heatmap_scs",
    "build_outputs",
    "build_sr",
    "fit_within",
    "is_evidence",
    "predecessor_sr",
    "study_results_dir",
]

log = logging.getLogger(__name__)

_EVIDENCE_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


@dataclass(frozen=True)
class OutputObject:
    """A DICOM object built for a result, and the file it is to be written to."""

    dataset: Dataset
    path: Path

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)


@dataclass(frozen=True)
class HeatmapOutput:
    """The heatmap SC of one instance."""

    instance_id: int
    output: OutputObject


@dataclass(frozen=True)
class StudyOutputs:
    """Everything a result puts on disk: the SR (None when no image was assessed), then SCs."""

    sr: OutputObject | None
    heatmaps: tuple[HeatmapOutput, ...]

    @property
    def objects(self) -> tuple[OutputObject, ...]:
        """SR first, then the SCs in image order."""
        head = (self.sr,) if self.sr is not None else ()
        return head + tuple(h.output for h in self.heatmaps)

    def heatmap_for(self, instance_id: int) -> OutputObject | None:
        return next((h.output for h in self.heatmaps if h.instance_id == instance_id), None)


def study_results_dir(results_dir: Path, study_uid: str) -> Path:
    """The folder of one study's result files (the UID is checked: it becomes a path).

    Raises:
        InvalidUIDError: ``study_uid`` is not a valid UID (PS3.5 §9.1).
    """
    return results_dir / require_uid(study_uid, "Study Instance UID")


def algorithm_info(info: ModelDescription) -> AlgorithmInfo:
    """The SR/SC algorithm identification (TID 4019) for a model."""
    return AlgorithmInfo(
        name=str(info.name),
        version=str(info.version),
        manufacturer="pneumo",
        model_name=str(info.name),
        parameters={
            "threshold": f"{float(info.threshold):.4f}",
            "weights_sha256": str(info.sha256),
            "intended_population": str(info.intended_population),
            "inference_precision": str(info.precision),
        },
    )


def fit_within(
    image: Image, heatmap: npt.NDArray[np.float32], max_side: int
) -> tuple[Image, npt.NDArray[np.float32]]:
    """Image and heatmap at the capture size (:func:`dicom_io.sc.capture_shape`).

    Each is scaled down (area average) unless it already has that shape: the
    single-pass model computes the heatmap at the capture size directly
    (:func:`worker.stages.predict.predict` asks it to), so then only the
    image is scaled.
    """
    target = capture_shape(image.shape, max_side)

    def fitted(a: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if a.shape == target:
            return a
        from PIL import Image as PILImage

        out = PILImage.fromarray(np.ascontiguousarray(a, dtype=np.float32), mode="F")
        size = (target[1], target[0])  # PIL: (width, height)
        resized = np.asarray(out.resize(size, PILImage.Resampling.BOX), dtype=np.float32)
        return np.clip(resized, 0.0, 1.0)

    return fitted(image), fitted(heatmap)


def is_evidence(ds: Dataset, study_uid: str) -> bool:
    """Only images that can be referenced (valid UIDs, this study) go in the SR evidence."""
    return all(is_valid_uid(str(ds.get(k, ""))) for k in _EVIDENCE_KEYWORDS) and (
        str(ds.StudyInstanceUID) == study_uid
    )


def predecessor_sr(database_url: str, study_id: int, revision: int) -> SRReference | None:
    """The SR that the SR of ``revision`` replaces: the newest earlier revision's, if any.

    Read from its file when that is still on disk and is the recorded SR;
    otherwise (file deleted, unreadable, replaced) built from the recorded
    UIDs (:func:`dicom_io.sr.result_sr_reference`).

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database failed.
        dicom_io.uids.InvalidUIDError: the recorded UIDs are not valid UIDs.
    """
    with session_scope(database_url) as session:
        previous = repo.previous_sr(session, study_id, revision)
    if previous is None:
        return None
    if previous.path and Path(previous.path).is_file():
        try:
            ds = read_header(previous.path, specific_tags=list(_EVIDENCE_KEYWORDS))
            if str(ds.get("SOPInstanceUID", "")) == previous.sop_instance_uid:
                return SRReference.from_dataset(ds)
        except (OSError, ValueError, EOFError, InvalidDicomError) as exc:  # InvalidUIDError too
            log.warning("study id %d: SR of revision %d unreadable (%s); using its recorded UIDs",
                        study_id, previous.revision, type(exc).__name__)  # fmt: skip
    return result_sr_reference(previous.study_uid, previous.model_version,
                               previous.sop_instance_uid)  # fmt: skip


def build_sr(
    predicted: PredictedStudy,
    assessment: Assessment,
    algorithm: AlgorithmInfo,
    out_dir: Path,
    predecessor: SRReference | None = None,
) -> OutputObject | None:
    """The result SR (TID 1500), or None when no chest image was assessed.

    TID 1500 needs a measurement group: with no finding there is no SR, and the
    result row records why nothing could be assessed. ``predecessor`` (the
    previous revision's SR) goes into its Predecessor Documents Sequence.

    Raises:
        ValueError: from :func:`dicom_io.sr.build_result_sr` (inconsistent evidence).
    """
    study = predicted.study
    findings = [
        ImageFinding(
            source=image.source,
            probability=float(image.prediction.probability),
            threshold=assessment.threshold,
        )
        for image in predicted.chest
    ]
    if not findings:
        return None
    evidence = [
        i.dataset
        for i in study.instances
        if i.dataset is not None and is_evidence(i.dataset, study.study_uid)
    ]
    sr = build_result_sr(
        evidence=evidence,
        findings=findings,
        algorithm=algorithm,
        revision=study.revision,
        summary=assessment.summary,
        flags=[flag.value for flag in assessment.flags],
        predecessors=() if predecessor is None else (predecessor,),
    )
    sr_uid = result_sr_uid(study.study_uid, algorithm.version, study.revision)
    return OutputObject(sr, out_dir / f"{require_uid(sr_uid, 'SR SOP Instance UID')}.dcm")


def _heatmap_sc(
    image: PredictedImage, algorithm: AlgorithmInfo, revision: int, out_dir: Path, max_side: int
) -> HeatmapOutput | None:
    if image.heatmap is None:
        return None
    pixels, heatmap = fit_within(image.image, image.heatmap, max_side)
    sc = build_heatmap_sc(
        source=image.source, image=pixels, heatmap=heatmap, algorithm=algorithm, revision=revision
    )
    sc_uid = require_uid(str(sc.SOPInstanceUID), "SC SOP Instance UID")
    return HeatmapOutput(image.instance.instance_id, OutputObject(sc, out_dir / f"{sc_uid}.dcm"))


def build_heatmap_scs(
    predicted: PredictedStudy, algorithm: AlgorithmInfo, out_dir: Path, *, max_side: int
) -> tuple[HeatmapOutput, ...]:
    """One heatmap Secondary Capture per chest image, scaled to ``max_side`` (0 = source size).

    Raises:
        ValueError: from :func:`dicom_io.sc.build_heatmap_sc` (shape or value problems).
    """
    revision = predicted.study.revision
    built = (_heatmap_sc(i, algorithm, revision, out_dir, max_side) for i in predicted.chest)
    return tuple(h for h in built if h is not None)


def build_outputs(
    predicted: PredictedStudy,
    assessment: Assessment,
    info: ModelDescription,
    *,
    results_dir: Path,
    heatmap_max_side: int,
    timer: StageTimer | None = None,
    predecessor: SRReference | None = None,
) -> StudyOutputs:
    """Build the SR and the heatmap SCs of a study, with their paths under ``results_dir``.

    ``predecessor`` is the previous revision's SR (:func:`predecessor_sr`),
    named by the new SR. Timed as ``sr`` and ``sc``.

    Raises:
        ValueError: an object cannot be built from these inputs (see :func:`build_sr`,
            :func:`build_heatmap_scs`).
    """
    algorithm = algorithm_info(info)
    out_dir = study_results_dir(results_dir, predicted.study.study_uid)
    with timed(timer, "sr"):
        sr = build_sr(predicted, assessment, algorithm, out_dir, predecessor)
    with timed(timer, "sc"):
        heatmaps = build_heatmap_scs(predicted, algorithm, out_dir, max_side=heatmap_max_side)
    return StudyOutputs(sr, heatmaps)
