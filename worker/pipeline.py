"""One study through the model: load → select → read pixels → inference →
heatmaps → database rows → SR + SC files. Delivery is :mod:`worker.delivery`.

Celery-free, so it can be run and tested directly; :mod:`worker.tasks` wraps
it with retries, job rows and dead-lettering. Every stage is timed and the
timings are stored on the result row.

Idempotent: the result row is keyed on (study, model version, revision) and
the SR/SC UIDs are derived from the same values, so running a study twice (a
redelivered task) replaces files and rows instead of duplicating them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select

from db import repository as repo
from db.engine import session_scope
from db.models import Instance, ResultStatus, SelectionStatus, Study
from dicom_io.uids import require_uid
from pneumo.settings import Settings
from worker.intended_use import OUTSIDE_INTENDED_USE, AgeEvidence, outside_intended_use, parse_da

log = logging.getLogger(__name__)

NOT_CHEST = "not-chest-xray"  # flag: an image looked unlike a chest X-ray (OOD)
NO_USABLE_IMAGE = "no-usable-image"  # flag: nothing the model could read


class StageTimer:
    """Wall-clock seconds per named stage, in the order they ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass
class LoadedInstance:
    instance_id: int
    sop_instance_uid: str
    dataset: Dataset | None  # None when the file could not be parsed
    selected: bool = False
    reason: str | None = None
    image: np.ndarray | None = None


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
    flags: tuple[str, ...]
    files: tuple[Path, ...]  # SR first, then SCs
    timings: dict[str, float] = field(default_factory=dict)


def study_results_dir(settings: Settings, study_uid: str) -> Path:
    return settings.results_dir / require_uid(study_uid, "Study Instance UID")


def write_dataset(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a Part 10 file atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    ds.save_as(tmp, enforce_file_format=True)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def fit_within(
    image: np.ndarray, heatmap: np.ndarray, max_side: int
) -> tuple[np.ndarray, np.ndarray]:
    """Image and heatmap scaled down (area average) so the longest side is ``max_side``.

    The heatmap SC is a display aid, not a diagnostic image: a 2048² RGB
    capture is 12 MB to build, store and send, a 1024² one a quarter of that.
    """
    height, width = image.shape
    if max_side <= 0 or max(height, width) <= max_side:
        return image, heatmap
    from PIL import Image

    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))

    def shrink(a: np.ndarray) -> np.ndarray:
        out = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), mode="F")
        return np.clip(np.asarray(out.resize(size, Image.BOX), dtype=np.float32), 0.0, 1.0)

    return shrink(image), shrink(heatmap)


def _age_evidence(ds: Dataset | None) -> AgeEvidence:
    if ds is None:
        return AgeEvidence()
    age = str(ds.get("PatientAge", "") or "").strip() or None
    return AgeEvidence(
        patient_age=age,
        birth_date=parse_da(ds.get("PatientBirthDate")),
        study_date=parse_da(ds.get("StudyDate")),
    )


def _is_evidence(ds: Dataset, study_uid: str) -> bool:
    """Only images that can be referenced (valid UIDs, this study) go in the SR evidence."""
    from dicom_io.uids import is_valid_uid

    keys = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
    return all(is_valid_uid(str(ds.get(k, ""))) for k in keys) and (
        str(ds.StudyInstanceUID) == study_uid
    )


def _load(session_url: str, study_id: int) -> tuple[Study, list[LoadedInstance]]:
    with session_scope(session_url) as session:
        study = session.get(Study, study_id)
        if study is None:
            raise LookupError(f"study id {study_id} not in the database")
        rows = session.execute(
            select(Instance).where(Instance.study_id == study_id).order_by(Instance.id)
        ).scalars().all()
        items = [(r.id, r.sop_instance_uid, r.path) for r in rows]
    loaded = []
    for instance_id, sop_uid, path in items:
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception as exc:  # missing or corrupt file: a reason, not a crash
            log.warning("instance %s unreadable: %s", sop_uid, type(exc).__name__)
            loaded.append(LoadedInstance(instance_id, sop_uid, None, reason="unreadable"))
            continue
        loaded.append(LoadedInstance(instance_id, sop_uid, ds))
    return study, loaded


def _select_and_read(items: Sequence[LoadedInstance], max_pixels_bits: int, timer: StageTimer) -> None:
    from dicom_io.pixels import PixelReadError, read_pixels
    from dicom_io.selection import SkipReason, select_instance

    with timer.stage("select"):
        for item in items:
            if item.dataset is None:
                continue
            selection = select_instance(item.dataset)
            item.selected, item.reason = selection.selected, selection.reason
    with timer.stage("read_pixels"):
        for item in items:
            if not item.selected or item.dataset is None:
                continue
            try:
                item.image = read_pixels(item.dataset, max_pixels_bits=max_pixels_bits)
            except PixelReadError as exc:
                item.selected, item.reason = False, SkipReason.undecodable(exc.kind)
            except Exception as exc:  # a decoder bug must not fail the whole study
                log.warning("instance %s: pixel read failed: %s", item.sop_instance_uid,
                            type(exc).__name__)
                item.selected, item.reason = False, SkipReason.undecodable("decode-failed")


def algorithm_info(info: Any) -> Any:
    """The SR/SC algorithm identification for a model's :class:`ModelInfo`."""
    from dicom_io.sr import AlgorithmInfo

    return AlgorithmInfo(
        name=str(info.name),
        version=str(info.version),
        manufacturer="pneumo",
        model_name=str(info.name),
        parameters={
            "threshold": f"{float(info.threshold):.4f}",
            "weights_sha256": str(info.sha256),
            "intended_population": str(getattr(info, "intended_population", "")),
        },
    )


def summary_text(probability: float | None, threshold: float, finding: bool | None) -> str:
    if probability is None:
        return "No image of this study could be assessed by the model."
    verdict = "Pneumonia suspected" if finding else "No pneumonia detected"
    relation = ">=" if finding else "<"
    return f"{verdict} (probability {probability:.4f} {relation} threshold {threshold:.4f})."


def run_study(
    settings: Settings,
    study_id: int,
    revision: int,
    *,
    predictor: Any | None = None,
    timer: StageTimer | None = None,
) -> StudyOutcome:
    """Run the model on every selected image of a study and store the result and files."""
    url = settings.effective_database_url
    timer = timer or StageTimer()
    if predictor is None:
        from model.inference import load_predictor

        with timer.stage("load_model"):
            predictor = load_predictor(settings.model_path)
    info = predictor.info

    with timer.stage("load"):
        study, items = _load(url, study_id)
    study_uid = require_uid(study.study_uid, "Study Instance UID")
    _select_and_read(items, settings.max_image_pixels_bits, timer)

    usable = [item for item in items if item.image is not None]
    with timer.stage("inference"):
        predictions = predictor.predict([item.image for item in usable]) if usable else []
    chest = [(item, p) for item, p in zip(usable, predictions) if p.is_chest]
    with timer.stage("heatmaps"):
        heatmaps = predictor.heatmaps([item.image for item, _ in chest]) if chest else []

    max_age = getattr(info, "max_age_years", None)
    if max_age is None:
        max_age = settings.intended_max_age_years
    first_ds = next((i.dataset for i in items if i.dataset is not None), None)
    outside = outside_intended_use(_age_evidence(first_ds), max_age)
    ood = len(chest) < len(usable)
    probability = max((p.probability for _, p in chest), default=None)
    finding = None if probability is None else any(p.finding for _, p in chest)
    status = ResultStatus.COMPLETE if chest else ResultStatus.NO_USABLE_IMAGE
    flags = tuple(
        flag
        for flag, on in (
            (OUTSIDE_INTENDED_USE, outside),
            (NOT_CHEST, ood),
            (NO_USABLE_IMAGE, not chest),
        )
        if on
    )
    threshold = float(info.threshold)
    summary = summary_text(probability, threshold, finding)

    from dicom_io.sr import ImageFinding, build_result_sr, result_sr_uid

    out_dir = study_results_dir(settings, study_uid)
    sr_uid = result_sr_uid(study_uid, str(info.version), revision)
    sr_path = out_dir / f"{require_uid(sr_uid, 'SR SOP Instance UID')}.dcm"
    algorithm = algorithm_info(info)

    # Files first, rows second: a row never names a file that is not on disk
    # yet. A crash in between leaves files with deterministic UIDs that the
    # retry simply overwrites.
    with timer.stage("sr"):
        findings = [
            ImageFinding(source=item.dataset, probability=float(p.probability), threshold=threshold)
            for item, p in chest
        ]
        evidence = [
            item.dataset for item in items
            if item.dataset is not None and _is_evidence(item.dataset, study_uid)
        ]
        # No finding, no SR (TID 1500 needs a measurement group): the result
        # row records why nothing could be assessed.
        sr = (
            build_result_sr(
                evidence=evidence,
                findings=findings,
                algorithm=algorithm,
                revision=revision,
                summary=summary,
                flags=flags,
            )
            if findings
            else None
        )
    sc_objects: dict[int, tuple[Dataset, Path]] = {}
    with timer.stage("sc"):
        from dicom_io.sc import build_heatmap_sc

        for (item, _), heatmap in zip(chest, heatmaps):
            image, heatmap = fit_within(item.image, heatmap, settings.heatmap_max_side)
            sc = build_heatmap_sc(
                source=item.dataset,
                image=image,
                heatmap=heatmap,
                algorithm=algorithm,
                revision=revision,
            )
            sc_uid = require_uid(str(sc.SOPInstanceUID), "SC SOP Instance UID")
            sc_objects[item.instance_id] = (sc, out_dir / f"{sc_uid}.dcm")

    with timer.stage("write_files"):
        files = [write_dataset(sr, sr_path)] if sr is not None else []
        files += [write_dataset(sc, path) for sc, path in sc_objects.values()]

    with timer.stage("db"), session_scope(url) as session:
        model_version_id = repo.ensure_model_version(
            session,
            name=str(info.name),
            version=str(info.version),
            sha256=str(info.sha256),
            threshold=threshold,
            intended_population=str(getattr(info, "intended_population", "")),
            max_age_years=max_age,
        )
        not_chest = {item.instance_id for item, p in zip(usable, predictions) if not p.is_chest}
        for item in items:
            if item.image is None:
                selection, reason = SelectionStatus.SKIPPED, item.reason or "unreadable"
            elif item.instance_id in not_chest:
                # Read by the model but judged out of distribution: not used for
                # the finding (its scores stay in image_result).
                selection, reason = SelectionStatus.SKIPPED, NOT_CHEST
            else:
                selection, reason = SelectionStatus.SELECTED, None
            repo.set_instance_selection(session, item.instance_id, selection, reason)
        images = []
        for item, p in zip(usable, predictions):
            sc_entry = sc_objects.get(item.instance_id)
            images.append(
                repo.ImageOutcome(
                    instance_id=item.instance_id,
                    probability=float(p.probability),
                    ood_score=float(p.ood_score),
                    is_chest=bool(p.is_chest),
                    finding=bool(p.finding),
                    sc_sop_instance_uid=str(sc_entry[0].SOPInstanceUID) if sc_entry else None,
                    sc_path=str(sc_entry[1]) if sc_entry else None,
                )
            )
        result_id = repo.save_result(
            session,
            repo.ResultRecord(
                study_id=study_id,
                model_version_id=model_version_id,
                revision=revision,
                status=status,
                probability=probability,
                finding=finding,
                threshold=threshold,
                ood=ood,
                outside_intended_use=outside,
                flags=flags,
                summary=summary,
                sr_sop_instance_uid=str(sr.SOPInstanceUID) if sr is not None else None,
                sr_path=str(sr_path) if sr is not None else None,
                timings=timer.seconds,
            ),
            images,
        )

    log.info(
        "study %s rev %d: %d instance(s), %d usable, status %s, flags %s",
        study_uid, revision, len(items), len(usable), status.value, ",".join(flags) or "-",
    )
    return StudyOutcome(
        study_id=study_id,
        study_uid=study_uid,
        revision=revision,
        result_id=result_id,
        status=status,
        probability=probability,
        finding=finding,
        flags=flags,
        files=tuple(files),
        timings=dict(timer.seconds),
    )
