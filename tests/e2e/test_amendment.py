"""A study amended after its result (a late instance) gets a new revision: a
second result row and a second SR with its own UID; the first one is kept."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]


def test_late_instance_makes_revision_two(
    e2e, procs, pacs, predictor, shared_data, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from db import repository as repo
    from db.engine import session_scope
    from pneumo.settings import Settings

    port = e2e.free_port()
    data_dir = tmp_path / "data"
    env = e2e.pneumo_env(data_dir, port, pacs)
    url = Settings(data_dir=data_dir).effective_database_url
    subprocess.run(e2e.pneumo("db", "upgrade"), env=env, check=True, timeout=120)
    procs.start("listen", e2e.pneumo("listen"), env)
    procs.start("worker", e2e.pneumo("worker"), env)
    e2e.wait_until(lambda: e2e.port_open(port), 30, "the listener port")

    study_uid = generate_uid()
    jpegs = sorted((shared_data / "kermany" / "test" / "PNEUMONIA").glob("*.jpeg"))[3:5]
    first = e2e.kermany_to_dicom(jpegs[0], tmp_path / "a.dcm", study_uid, "A1")
    late = e2e.kermany_to_dicom(jpegs[1], tmp_path / "b.dcm", study_uid, "A1")

    def revisions() -> list[int]:
        with session_scope(url) as session:
            return sorted(r.revision for r in repo.recent_results(session, study_uid=study_uid))

    assert e2e.storescu(port, [first]).returncode == 0
    e2e.wait_until(lambda: revisions() == [1], 120, "revision 1\n" + e2e.logs(tmp_path))
    assert e2e.storescu(port, [late]).returncode == 0
    e2e.wait_until(lambda: revisions() == [1, 2], 120, "revision 2\n" + e2e.logs(tmp_path))

    with session_scope(url) as session:
        rows = {r.revision: r for r in repo.recent_results(session, study_uid=study_uid)}
    srs = {rev: pydicom.dcmread(rows[rev].sr_path) for rev in (1, 2)}
    assert srs[1].SOPInstanceUID != srs[2].SOPInstanceUID
    # Revision 2 reports on both images of the study.
    from dicom_io.pixels import read_pixels

    images = [read_pixels(pydicom.dcmread(p)) for p in (first, late)]
    chest = [p.probability for p in predictor.predict(images) if p.is_chest]
    if chest:
        assert rows[2].probability == pytest.approx(max(chest), abs=1e-5)
