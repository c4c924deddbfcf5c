"""Real rows for the staff search and API tests, written through ``db.repository``.

Six studies: pneumonia and normal results, a study with a skipped lateral, one
outside intended use, one not processed yet, one with two revisions and two
model versions. The demo studies' DICOM files are copied in as the archived
instances, and a real heatmap Secondary Capture is built for the first one.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
from sqlalchemy import update

from db import repository as repo
from db.engine import session_scope
from db.migrate import upgrade
from db.models import ResultStatus, SelectionStatus, Study, StudyStatus
from tests.paths import SAMPLES

__all__ = ["SeededStudy", "seed"]

DEST = "PACS@127.0.0.1:104"
T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)


@dataclass(frozen=True)
class SeededStudy:
    study_uid: str
    sop_uids: tuple[str, ...]
    patient_id: str
    accession: str


def _heatmap_sc(source: Path, out: Path, revision: int) -> str:
    from dicom_io.pixels import read_pixels
    from dicom_io.sc import build_heatmap_sc
    from dicom_io.sr import AlgorithmInfo

    ds = pydicom.dcmread(source)
    image = read_pixels(ds)
    yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    heat = np.exp(-(((yy - image.shape[0] / 2) ** 2 + (xx - image.shape[1] / 3) ** 2) / 800.0))
    algorithm = AlgorithmInfo("pneumonet", "1.0.0", "pneumo tests", "pneumonet")
    sc = build_heatmap_sc(
        source=ds, image=image, heatmap=heat.astype(np.float32), algorithm=algorithm,
        revision=revision,
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    sc.save_as(out, enforce_file_format=True)
    return str(sc.SOPInstanceUID)


def seed(url: str, data_dir: Path) -> list[SeededStudy]:
    """Migrate ``url`` and fill it; return the studies in the order they were received."""
    upgrade(url)
    files = sorted((SAMPLES / "studies").glob("*.dcm"))
    by_study: dict[str, list[Path]] = {}
    for f in files:
        by_study.setdefault(
            str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID), []
        ).append(f)
    demo = list(by_study.items())  # 4 demo studies; demo2 has a PA and a lateral
    seeded: list[SeededStudy] = []
    # (patient, accession, study date, age, outcome)
    plan = [
        ("P001", "ACC001", date(2026, 11, 1), "005Y", "pneumonia"),
        ("P002", "ACC002", date(2026, 11, 2), "007Y", "normal-with-lateral"),
        ("P003", "ACC003", date(2026, 11, 3), "045Y", "outside"),
        ("P001", "ACC004", date(2026, 11, 4), "006Y", "two-revisions"),
        ("P005", "ACC005", date(2026, 11, 5), "004Y", "queued"),
        ("P006", "ACC006", date(2026, 11, 6), "003Y", "no-usable"),
    ]
    with session_scope(url) as s:
        v1 = repo.ensure_model_version(
            s, name="pneumonet", version="1.0.0", sha256="a" * 64, threshold=0.5, max_age_years=17
        )
        v2 = repo.ensure_model_version(
            s, name="pneumonet", version="1.1.0", sha256="b" * 64, threshold=0.4, max_age_years=17
        )
    for n, (patient, accession, study_date, age, outcome) in enumerate(plan):
        received = T0 + timedelta(hours=n)
        if n < len(demo):
            study_uid, sources = demo[n]
        else:
            study_uid, sources = f"2.25.{9000 + n}", [demo[0][1][0]]  # a demo image, new UIDs
        sop_uids: list[str] = []
        instance_ids: list[int] = []
        with session_scope(url) as s:
            for k, src in enumerate(sources):
                sop = str(pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID)
                if n >= len(demo):
                    sop = f"{study_uid}.{k + 1}"
                dest = data_dir / "spool" / study_uid / f"{sop}.dcm"
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest)
                instance_ids.append(repo.record_instance(s, repo.InstanceRecord(
                    study_uid=study_uid, series_uid=f"{study_uid}.1", sop_instance_uid=sop,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=str(dest), size=dest.stat().st_size, calling_aet="PACS", received_at=received,
                )))  # fmt: skip
                sop_uids.append(sop)
            header = repo.StudyHeader(
                patient_id=patient,
                accession_number=accession,
                study_date=study_date,
                patient_age=age,
            )
            study_id, revision = repo.mark_study_queued(s, study_uid, amended=False, header=header)
            s.execute(update(Study).where(Study.id == study_id).values(received_at=received))
        seeded.append(SeededStudy(study_uid, tuple(sop_uids), patient, accession))
        if outcome == "queued":
            continue
        with session_scope(url) as s:
            skipped = outcome == "normal-with-lateral"
            for k, iid in enumerate(instance_ids):
                if skipped and k == 1:
                    repo.set_instance_selection(s, iid, SelectionStatus.SKIPPED, "lateral-view")
                else:
                    repo.set_instance_selection(s, iid, SelectionStatus.SELECTED, None)
            runs = [(v1, revision, 0.91 if outcome in ("pneumonia", "two-revisions") else 0.12)]
            if outcome == "two-revisions":
                runs = [(v1, 1, 0.30), (v2, 2, 0.83)]
            for model_id, rev, p in runs:
                if outcome == "no-usable":
                    record = repo.ResultRecord(study_id=study_id, model_version_id=model_id, revision=rev,
                        status=ResultStatus.NO_USABLE_IMAGE, probability=None, finding=None, threshold=0.5,
                        ood=True, outside_intended_use=False, flags=("not-chest-xray", "no-usable-image"))  # fmt: skip
                    repo.save_result(s, record, [])
                    continue
                threshold = 0.5 if model_id == v1 else 0.4
                sc_uid = sc_path = None
                if n == 0:
                    sc_file = data_dir / "results" / study_uid / f"sc-{rev}.dcm"
                    sc_uid = _heatmap_sc(sources[0], sc_file, rev)
                    sc_path = str(sc_file)
                flags = ("outside-intended-use",) if outcome == "outside" else ()
                record = repo.ResultRecord(study_id=study_id, model_version_id=model_id, revision=rev,
                    status=ResultStatus.COMPLETE, probability=p, finding=p >= threshold, threshold=threshold,
                    ood=False, outside_intended_use=outcome == "outside", flags=flags,
                    sr_sop_instance_uid=f"{study_uid}.99{rev}", sr_path=str(data_dir / "results" / study_uid / f"sr-{rev}.dcm"),
                    timings={"select": 0.01, "predict": 0.2})  # fmt: skip
                images = [repo.ImageOutcome(instance_id=instance_ids[0], probability=p, ood_score=0.1, is_chest=True,
                    finding=p >= threshold, sc_sop_instance_uid=sc_uid, sc_path=sc_path)]  # fmt: skip
                result_id = repo.save_result(s, record, images)
                delivery = repo.ensure_delivery(s, result_id, DEST)
                repo.record_delivery_attempt(s, delivery, ok=True)
            s.flush()
            if outcome == "two-revisions":
                s.execute(update(Study).where(Study.id == study_id).values(revision=2))
            repo.set_study_status(s, study_id, StudyStatus.DONE)
    return seeded
