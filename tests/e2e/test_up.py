"""`pneumo up` runs the embedded stack (and serves the staff API) in one command and stops cleanly on Ctrl-C.

Started as a subprocess (ephemeral port, temporary data dir, no servers), it
receives a study over DICOM, produces the result, delivers the SR; SIGINT then
makes it exit 0 within seconds, leaving no worker processes and no embedded
redis-server behind.
"""

from __future__ import annotations

import signal
import subprocess
import urllib.request
from pathlib import Path

import psutil
import pytest
from pydicom.uid import generate_uid

from worker import embedded_broker

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]


def test_up_end_to_end_and_ctrl_c(e2e, procs, pacs, predictor, shared_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from db import repository as repo
    from db.engine import session_scope
    from pneumo.settings import Settings

    port = e2e.free_port()
    data_dir = tmp_path / "data"
    api_port = e2e.free_port()
    env = {**e2e.pneumo_env(data_dir, port, pacs), "PNEUMO_API_PORT": str(api_port)}
    up = procs.start("up", e2e.pneumo("up"), env)
    e2e.wait_until(lambda: e2e.port_open(port), 60, "the listener port\n" + e2e.logs(tmp_path))
    e2e.wait_until(lambda: e2e.port_open(api_port), 30, "the API port\n" + e2e.logs(tmp_path))
    with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/api/health", timeout=10) as health:
        assert health.status == 200  # `pneumo up` serves the staff API too

    study_uid = generate_uid()
    jpeg = sorted((shared_data / "kermany" / "test" / "PNEUMONIA").glob("*.jpeg"))[1]
    dcm = e2e.kermany_to_dicom(jpeg, tmp_path / "study.dcm", study_uid, "ACC0100")
    sent = e2e.storescu(port, [dcm])
    assert sent.returncode == 0, sent.stderr

    url = Settings(data_dir=data_dir).effective_database_url

    def delivered() -> bool:
        with session_scope(url) as session:
            rows = repo.recent_results(session, study_uid=study_uid)
        return bool(rows) and rows[0].deliveries == ((pacs.destination, "sent"),)

    e2e.wait_until(delivered, 120, "the result to be delivered\n" + e2e.logs(tmp_path))
    assert any(p.name.startswith("SR") for p in pacs.received())

    family = psutil.Process(up.pid).children(recursive=True)
    assert family, "pneumo up should run its worker as a separate process"
    up.send_signal(signal.SIGINT)
    try:
        code = up.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail("pneumo up did not stop within 20 s of SIGINT\n" + e2e.logs(tmp_path))
    assert code == 0, e2e.logs(tmp_path)
    _, alive = psutil.wait_procs(family, timeout=5)
    assert alive == [], f"orphans left: {[p.pid for p in alive]}"
    assert embedded_broker.running_pid(data_dir) is None, "the embedded redis-server was left"
