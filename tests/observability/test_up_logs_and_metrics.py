"""A real ``pneumo up`` (listener, Celery worker, API) with ``PNEUMO_LOG_FORMAT=json``: every
log line is a JSON object, none carries the test patient's name, IDs or dates, and the
API's ``/metrics`` counts the listener's C-STOREs and the processed study."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from tests.e2e.conftest import Pacs, Processes, free_port, pneumo, pneumo_env, port_open, wait_until
from tests.observability.conftest import parse, value

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]

NAME = "Quokkaberry^Zyxwlyn"
PATIENT_ID = "QKB7731946"
ACCESSION = "QKA4471"
BIRTH_DATE, STUDY_DATE = "19730419", "19990317"
PHI = ("Quokkaberry", "Zyxwlyn", PATIENT_ID, ACCESSION, BIRTH_DATE, STUDY_DATE,
       "1973-04-19", "1999-03-17")  # fmt: skip


def _need_weights() -> None:
    inference = pytest.importorskip("model.inference")
    try:
        inference.default_weights_path()
    except inference.WeightsError:
        pytest.skip("no model weights yet")


def _scrape(api_port: int) -> dict:  # type: ignore[type-arg]
    return parse(httpx.get(f"http://127.0.0.1:{api_port}/metrics", timeout=30).text)


def _done(api_port: int) -> bool:
    try:
        return value(_scrape(api_port), "pneumo_studies", status="done") == 1
    except (KeyError, httpx.HTTPError):
        return False


def test_json_logs_without_phi_and_metrics_of_a_real_flow(
    procs: Processes, pacs: Pacs, tmp_path: Path
) -> None:
    from tests.dicom_receive.dicom_receive_helpers import make_instance, scu_store
    from tests.reliability.stack import chest

    _need_weights()
    port, api_port = free_port(), free_port()
    env = pneumo_env(
        tmp_path / "data", port, pacs, PNEUMO_LOG_FORMAT="json", PNEUMO_API_PORT=str(api_port)
    )
    up = procs.start("up", pneumo("up"), env)
    wait_until(lambda: port_open(port) and port_open(api_port), 90, "listener and API")

    study = generate_uid()
    ds = chest(make_instance(study, rows=256, cols=256))
    ds.PatientName, ds.PatientID, ds.AccessionNumber = NAME, PATIENT_ID, ACCESSION
    ds.PatientBirthDate, ds.StudyDate = BIRTH_DATE, STUDY_DATE
    assert scu_store(port, [ds, ds]) == [0, 0]  # the second is a duplicate

    wait_until(lambda: _done(api_port), 60, "the study to be processed")
    m = _scrape(api_port)
    assert value(m, "pneumo_instances_received_total", outcome="stored") == 1
    assert value(m, "pneumo_instances_received_total", outcome="duplicate") == 1
    assert value(m, "pneumo_studies", status="done") == 1
    assert value(m, "pneumo_workers", state="live") == 1
    assert value(m, "pneumo_stage_seconds_count", stage="load") == 1
    assert value(m, "pneumo_study_processing_seconds_count") == 1
    assert any(name == "pneumo_model_info" and ("active", "1") in labels for name, labels in m)

    assert procs.stop(up, signal.SIGINT, timeout=60) == 0
    text = (tmp_path / "up.log").read_text(errors="replace")
    leaked = [v for v in PHI if v.lower() in text.lower()]
    assert leaked == [], f"PHI in the logs: {leaked}"

    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert records, "no JSON log line"
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record)
    loggers = {r["logger"] for r in records}
    assert any(name.startswith("dicom_io") for name in loggers), loggers  # the listener
    assert any(name.startswith(("worker", "celery")) for name in loggers), loggers  # the worker
    # A study can be followed across processes by its UID; an address is not a UID.
    assert len({r["process"] for r in records if study in r.get("uids", ())}) >= 2
    assert not any("127.0.0.1" in r.get("uids", ()) for r in records)
    # Lines that are not JSON are the commands' own prints and Celery's banner, never a log.
    for line in text.splitlines():
        assert not line[:4].isdigit() or " INFO " not in line, f"a text log line: {line}"
