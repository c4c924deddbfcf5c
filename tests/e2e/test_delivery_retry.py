"""A failed send is retried by its own task, from the stored files, without
running the model again: the PACS is down when the result is ready and comes
up later; the SR then arrives and the study has exactly one inference job."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]


def test_send_retried_without_reinference(
    e2e, procs, predictor, shared_data, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from db.engine import session_scope
    from db.models import Delivery, DeliveryStatus, Job, JobKind
    from pneumo.settings import Settings

    pacs_port = e2e.free_port()  # nothing listens here yet
    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    port = e2e.free_port()
    data_dir = tmp_path / "data"

    class Down:  # the destination, before the PACS is started
        destination = f"PACS@127.0.0.1:{pacs_port}"

    env = e2e.pneumo_env(
        data_dir, port, Down, PNEUMO_SEND_BACKOFF_SECONDS="1", PNEUMO_SEND_RETRIES="6"
    )
    url = Settings(data_dir=data_dir).effective_database_url
    subprocess.run(e2e.pneumo("db", "upgrade"), env=env, check=True, timeout=120)
    procs.start("listen", e2e.pneumo("listen"), env)
    procs.start("worker", e2e.pneumo("worker"), env)
    e2e.wait_until(lambda: e2e.port_open(port), 30, "the listener port")

    study_uid = generate_uid()
    jpeg = sorted((shared_data / "kermany" / "test" / "NORMAL").glob("*.jpeg"))[2]
    sent = e2e.storescu(port, [e2e.kermany_to_dicom(jpeg, tmp_path / "s.dcm", study_uid, "A9")])
    assert sent.returncode == 0, sent.stderr

    def delivery() -> Delivery | None:
        with session_scope(url) as session:
            return session.execute(select(Delivery)).scalar_one_or_none()

    e2e.wait_until(
        lambda: (d := delivery()) is not None and d.status is DeliveryStatus.FAILED,
        120,
        "a failed first delivery\n" + e2e.logs(tmp_path),
    )

    procs.start(
        "storescp",
        ["/usr/bin/storescp", "-aet", "PACS", "-od", str(pacs_dir), "+xa", str(pacs_port)],
        dict(os.environ, TCP_NODELAY="1"),
    )
    e2e.wait_until(
        lambda: delivery().status is DeliveryStatus.SENT,
        90,
        "the retried delivery\n" + e2e.logs(tmp_path),
    )

    assert any(p.name.startswith("SR") for p in pacs_dir.iterdir())
    with session_scope(url) as session:
        kinds = [j.kind for j in session.execute(select(Job)).scalars()]
    assert kinds.count(JobKind.PROCESS) == 1  # the model ran once
    assert kinds.count(JobKind.DELIVER) >= 1
    assert delivery().attempts >= 2
