"""A database outage is not a receive outage (issue 8, item 4; fault suite item 2,
receive side): a private PostgreSQL is stopped while DCMTK ``storescu`` sends to a real
``pneumo listen``; every C-STORE still gets Success (the spool comes first), promptly
(the database write has a connect timeout), and once the database is back the listener's
retries record and queue every study."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from pydicom.uid import generate_uid
from sqlalchemy import select

from db import migrate
from db.engine import get_engine, session_scope
from db.models import Study, StudyStatus
from tests.conftest import need_dcmtk, port_open
from tests.dicom_receive.dicom_receive_helpers import make_instance, write_instance
from tests.paths import REPO
from tests.reliability.services import PrivatePostgres, PrivateRedis, free_port, wait_until

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]


def _send(port: int, files: list[Path]) -> tuple[int, float]:
    started = time.monotonic()
    done = subprocess.run(
        ["/usr/bin/storescu", "-aec", "PNEUMO", "-R", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TCP_NODELAY="1"),
    )
    return done.returncode, time.monotonic() - started


def _queued(url: str) -> dict[str, tuple[StudyStatus, int]]:
    with session_scope(url) as session:
        return {
            s.study_uid: (s.status, len(s.instances))
            for s in session.execute(select(Study)).scalars()
        }


def test_listener_keeps_receiving_while_postgres_is_down_and_queues_after(
    private_postgres: PrivatePostgres, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    need_dcmtk("storescu")
    url = private_postgres.url
    migrate.upgrade(url)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PNEUMO_")}
    env.update(
        PNEUMO_DATA_DIR=str(tmp_path / "data"),
        PNEUMO_DATABASE_URL=url,
        PNEUMO_BROKER_URL=private_redis.url,
        PNEUMO_PORT=str(port),
        PNEUMO_STUDY_QUIET_SECONDS="0.5",
        PNEUMO_STUDY_RELEASE_GRACE_SECONDS="0.2",
        PYTHONPATH=str(REPO),
        TCP_NODELAY="1",
    )
    log = open(tmp_path / "listen.log", "wb")
    listen = subprocess.Popen(
        [sys.executable, "-m", "pneumo.cli", "listen"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: port_open("127.0.0.1", port, 0.2), 60, "pneumo listen")
        studies = {generate_uid(): [] for _ in range(3)}
        for uid, files in studies.items():
            files.extend(
                write_instance(make_instance(uid, seed=i), tmp_path / uid) for i in range(2)
            )

        private_postgres.stop()
        get_engine.cache_clear()  # this process's pool, not the listener's
        for files in studies.values():
            code, seconds = _send(port, files)
            assert code == 0, (tmp_path / "listen.log").read_text(errors="replace")[-3000:]
            assert seconds < 20, f"C-STORE took {seconds:.1f}s with the database down"
        time.sleep(3)  # the listener's first attempts fail while the database is down
        assert listen.poll() is None

        private_postgres.start()
        wait_until(
            lambda: all(_queued(url).get(uid) == (StudyStatus.QUEUED, 2) for uid in studies),
            120,
            "every study recorded and queued after the database returned",
        )
        wake_ups = redis.Redis(host="127.0.0.1", port=private_redis.port).llen("realtime")
        assert wake_ups >= len(studies)
        text = (tmp_path / "listen.log").read_text(errors="replace")
        assert "study-ready callback failed" in text  # it really was refused, then retried
        assert "SECRET" not in text and "PHI-12345" not in text
    finally:
        listen.terminate()
        try:
            listen.wait(20)
        except subprocess.TimeoutExpired:
            listen.kill()
            listen.wait()
        log.close()
