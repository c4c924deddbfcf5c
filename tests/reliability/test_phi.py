"""PHI stays out of what operators read (issue 8, fault suite item 8).

A small end-to-end flow through ``pneumo up`` with distinctive patient names,
IDs and birth dates, including the inputs that used to leak them (an invalid
birth date quoted by the SR build's error, a NUL in the Patient ID, a decoder
crash), then every log file, the other files beside the spool and the database
(journals, the broker's append-only file), ``study.last_error``, ``job.error``
and ``pneumo status`` output are scanned for those values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import RLELossless, generate_uid
from sqlalchemy import select

from db.engine import session_scope
from db.models import Job, Study
from tests.dicom_receive.dicom_receive_helpers import make_instance, scu_store
from tests.reliability.stack import chest, start_stack

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]

NAME = "Quokkaberry^Zyxwlyn"
PATIENT_ID = "QKB7731946"
ACCESSION = "QKA4471"
BIRTH_DATES = ("19730419", "19800231")  # a valid and an invalid DA
PHI = ("Quokkaberry", "Zyxwlyn", PATIENT_ID, ACCESSION, *BIRTH_DATES, "1973-04-19")


def _patient(ds, birth_date: str):  # type: ignore[no-untyped-def]
    ds.PatientName, ds.PatientID, ds.AccessionNumber = NAME, PATIENT_ID, ACCESSION
    ds.PatientBirthDate = birth_date
    return chest(ds)


def _hits(text: str) -> list[str]:
    return [value for value in PHI if value.lower() in text.lower()]


def _beside_phi_stores(data_dir: Path) -> list[Path]:
    files = [p for p in data_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    return [
        p
        for p in files
        if p.suffix != ".dcm"
        and "results" not in p.relative_to(data_dir).parts
        and not p.name.startswith("pneumo.db")
        and not p.name.endswith(".log")  # scanned above
    ]


def test_no_patient_value_in_logs_errors_or_status(procs, pacs, predictor, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack = start_stack(procs, pacs, tmp_path)
    studies = [generate_uid() for _ in range(4)]
    plain = _patient(make_instance(studies[0]), BIRTH_DATES[0])
    bad_date = _patient(make_instance(studies[1]), BIRTH_DATES[1])
    nul_id = _patient(make_instance(studies[2]), BIRTH_DATES[0])
    nul_id.PatientID = PATIENT_ID[:4] + "\x00" + PATIENT_ID[4:]
    crashing = _patient(make_instance(studies[3], rows=64, cols=64), BIRTH_DATES[1])
    crashing.PixelData = np.zeros((64, 64), dtype=np.uint16).tobytes()
    crashing.compress(RLELossless, encoding_plugin="pydicom")
    crashing.Rows = 63  # the RLE decoder panics

    assert scu_store(stack.port, [plain, bad_date, nul_id, crashing]) == [0] * 4
    stack.wait_terminal(studies)

    found: dict[str, list[str]] = {}
    our_logs = [p for p in tmp_path.rglob("*.log") if p.name != "storescp.log"]  # not ours
    assert our_logs, "the stack wrote no log to scan"
    assert any(p.suffix == ".json" for p in _beside_phi_stores(stack.data_dir))  # journals
    for log in our_logs:
        found[str(log.relative_to(tmp_path))] = _hits(log.read_text(errors="replace"))
    # Everything else the stack keeps beside the PHI stores (the spooled and
    # result DICOM files, the database): journals, the broker's append-only
    # file, pid files... none may hold a patient value either.
    for other in _beside_phi_stores(stack.data_dir):
        found[str(other.relative_to(tmp_path))] = _hits(other.read_bytes().decode("latin-1"))
    with session_scope(stack.url) as session:
        for uid, error in session.execute(select(Study.study_uid, Study.last_error)):
            found[f"last_error {uid}"] = _hits(error or "")
        for job_id, error in session.execute(select(Job.id, Job.error)):
            found[f"job.error {job_id}"] = _hits(error or "")
    found["pneumo status"] = _hits(stack.status_output())
    leaks = {where: hits for where, hits in found.items() if hits}
    assert leaks == {}, f"PHI found: {leaks}"
