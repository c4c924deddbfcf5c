"""End to end with real parts: `pneumo listen` and `pneumo worker` as separate
processes, DCMTK storescu as the modality, DCMTK storescp as the PACS.

Sent: the real chest DICOMs from ``../shared/data/dicom/cxr`` (RG1 as one study
of two instances: lossless and lossy JPEG 2000; three NIH studies), two Kermany
test JPEGs converted to DICOM here (a child, synthetic patient data), a CT
put into one Kermany study and a CT alone in its own study.
(The NIH file ``nih_gcp_*`` is left out: it carries the same SOP Instance UID
as ``udacity_aihcnd_test1.dcm``, so it would replace it.)

Checked: exactly one result row per study whose probability equals what the
model gives for the same files directly; the SR arrived at the PACS stand-in
and dsrdump shows that probability; skipped instances carry reasons; adults
are flagged outside the intended use; CLI listings agree. Run once on the
embedded default (SQLite + the private redis-server broker) and once on Redis + PostgreSQL.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]

PROBABILITY = re.compile(r'NUM:\([^)]*"Probability"\)="([^"]+)"')


def with_study(source: Path, out: Path, study_uid: str) -> Path:
    """A copy of ``source`` moved into ``study_uid`` (fresh series and instance UIDs)."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out)
    return out


def build_inputs(
    e2e,
    shared: Path,
    work: Path,  # type: ignore[no-untyped-def]
) -> tuple[list[Path], dict[str, bool | None]]:
    """Files to send, and for each study whether it is an adult (outside intended use)."""
    work.mkdir()
    cxr = shared / "dicom" / "cxr"
    files = [cxr / "RG1_UNCR.dcm", cxr / "RG1_J2KI.dcm"]
    files += [cxr / f"udacity_aihcnd_test{i}.dcm" for i in (1, 2, 3)]
    ct = shared / "dicom" / "other" / "CT_small.dcm"
    kermany = shared / "kermany" / "test"
    normal = sorted((kermany / "NORMAL").glob("*.jpeg"))[0]
    pneumonia = sorted((kermany / "PNEUMONIA").glob("*.jpeg"))[0]
    study_n, study_p = generate_uid(), generate_uid()
    files.append(e2e.kermany_to_dicom(normal, work / "kermany_normal.dcm", study_n, "ACC0001"))
    files.append(
        e2e.kermany_to_dicom(pneumonia, work / "kermany_pneumonia.dcm", study_p, "ACC0002")
    )
    files.append(with_study(ct, work / "ct_in_child_study.dcm", study_p))
    files.append(ct)  # a study of its own with nothing the model can read
    # RG1 (born 1940, imaged 2004) and the NIH studies are adults; the Kermany
    # studies are children; the CT-only study is not checked (None).
    adult: dict[str, bool | None] = {study_n: False, study_p: False}
    for f in files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
        adult.setdefault(uid, None if f == ct else True)
    return files, adult


def expected_probabilities(files: list[Path], predictor) -> dict[str, float | None]:  # type: ignore[no-untyped-def]
    """Per study: max calibrated probability over its chest images, straight from the model."""
    from dicom_io.pixels import PixelReadError, read_pixels
    from dicom_io.selection import select_instance

    images: dict[str, list[np.ndarray]] = defaultdict(list)
    for f in files:
        ds = pydicom.dcmread(f)
        uid = str(ds.StudyInstanceUID)
        images.setdefault(uid, [])
        if not select_instance(ds).selected:
            continue
        try:
            images[uid].append(read_pixels(ds))
        except PixelReadError:
            continue
    expected: dict[str, float | None] = {}
    for uid, imgs in images.items():
        chest = [p.probability for p in predictor.predict(imgs) if p.is_chest] if imgs else []
        expected[uid] = max(chest) if chest else None
    return expected


def run_e2e(e2e, procs, pacs, predictor, shared, tmp_path: Path, extra_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from db import repository as repo
    from db.engine import session_scope
    from db.models import Instance, SelectionStatus, Study, StudyStatus
    from pneumo.settings import Settings

    port = e2e.free_port()
    data_dir = tmp_path / "data"
    env = e2e.pneumo_env(data_dir, port, pacs, **extra_env)
    settings = Settings(
        data_dir=data_dir,
        database_url=extra_env.get("PNEUMO_DATABASE_URL"),
        broker_url=extra_env.get("PNEUMO_BROKER_URL"),
    )
    url = settings.effective_database_url

    subprocess.run(e2e.pneumo("db", "upgrade"), env=env, check=True, timeout=120)
    listener = procs.start("listen", e2e.pneumo("listen"), env)
    worker = procs.start("worker", e2e.pneumo("worker", "--concurrency", "1"), env)
    e2e.wait_until(lambda: e2e.port_open(port), 30, "the listener port")

    files, adult = build_inputs(e2e, shared, tmp_path / "inputs")
    expected = expected_probabilities(files, predictor)
    sent = e2e.storescu(port, files)
    assert sent.returncode == 0, sent.stderr + sent.stdout

    def all_done() -> bool:
        with session_scope(url) as session:
            statuses = dict(session.execute(select(Study.study_uid, Study.status)).all())
        bad = [s for s in statuses.values() if s is StudyStatus.DEAD_LETTER]
        assert not bad, e2e.logs(tmp_path)
        return set(expected) <= set(statuses) and all(
            statuses[uid] is StudyStatus.DONE for uid in expected
        )

    e2e.wait_until(all_done, 240, "every study processed\n" + e2e.logs(tmp_path))
    with_sr = {uid for uid, p in expected.items() if p is not None}
    assert len(with_sr) >= 1, "the model saw no chest X-ray at all"

    def sr_files() -> dict[str, Path]:
        found = {}
        for path in pacs.received():
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34":
                found[str(ds.StudyInstanceUID)] = path
        return found

    e2e.wait_until(lambda: set(sr_files()) >= with_sr, 60, "the SRs at the PACS")
    at_pacs = sr_files()

    with session_scope(url) as session:
        for uid, probability in expected.items():
            rows = repo.recent_results(session, study_uid=uid)
            assert len(rows) == 1, f"study {uid}: {len(rows)} result rows"
            row = rows[0]
            if adult[uid] is not None:
                assert ("outside-intended-use" in row.flags) == adult[uid], (uid, row.flags)
            if probability is None:
                assert row.probability is None and row.result_status == "no-usable-image"
                assert uid not in at_pacs
                continue
            assert row.probability == pytest.approx(probability, abs=1e-5)
            assert row.deliveries == ((pacs.destination, "sent"),)
            shown = [float(v) for v in PROBABILITY.findall(e2e.dsrdump(at_pacs[uid]))]
            assert any(abs(v - probability) < 1e-5 for v in shown), (uid, shown, probability)
        skipped = (
            session.execute(select(Instance).where(Instance.selection == SelectionStatus.SKIPPED))
            .scalars()
            .all()
        )
        # The two CTs (one in the child's study, one alone) are skipped with a reason.
        assert sum(1 for i in skipped if i.skip_reason == "modality:CT") == 2
        assert all(i.skip_reason for i in skipped)
        pending = (
            session.execute(select(Instance).where(Instance.selection == SelectionStatus.PENDING))
            .scalars()
            .all()
        )
        assert pending == []

    listing = subprocess.run(
        e2e.pneumo("results", "--format", "json"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    listed = {r["study_uid"]: r for r in json.loads(listing.stdout)}
    assert set(listed) == set(expected)
    assert all(
        ("outside-intended-use" in listed[u]["flags"]) == adult[u]
        for u in expected
        if adult[u] is not None
    )
    status = subprocess.run(
        e2e.pneumo("status", "--format", "json"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(status.stdout)["studies"] == {"done": len(expected)}

    assert procs.stop(listener) == 0
    assert procs.stop(worker) == 0


def test_embedded_default(e2e, procs, pacs, predictor, shared_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run_e2e(e2e, procs, pacs, predictor, shared_data, tmp_path, {})


@pytest.mark.redis
@pytest.mark.postgres
def test_redis_and_postgresql(
    e2e,
    procs,
    pacs,
    predictor,
    shared_data,
    redis_url,
    pg_url,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    run_e2e(
        e2e,
        procs,
        pacs,
        predictor,
        shared_data,
        tmp_path,
        {"PNEUMO_BROKER_URL": redis_url, "PNEUMO_DATABASE_URL": pg_url},
    )
