"""Fault suite 2 (worker side): PostgreSQL stopped for 20 s while a worker processes studies.

Nothing is acknowledged unrecorded: an attempt that cannot reach the database
when it starts, mid-pipeline or when it records its outcome is retried with
backoff (``self.retry``), so every study is done, exactly once, after the
database returns. Real processes: a private PostgreSQL cluster (``initdb`` +
``pg_ctl`` on its own port), a private ``redis-server``, ``pneumo worker``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.reliability.services import (
    PrivatePostgres,
    PrivateRedis,
    Stack,
    WorkerProcesses,
    assert_done_once,
    wait_all_done,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

OUTAGE_SECONDS = 20


def test_studies_done_after_a_postgres_outage_mid_processing(
    private_postgres: PrivatePostgres,
    private_redis: PrivateRedis,
    workers: WorkerProcesses,
    tmp_path: Path,
) -> None:
    stack = Stack(tmp_path / "data", private_postgres.url, private_redis.url)
    env = stack.env(fault_test_delay_seconds="2", task_retry_backoff_seconds="0.5")
    url = stack.database_url
    studies = [stack.record() for _ in range(3)]
    workers.start_worker(env, "steady")
    for study_id in studies:
        stack.publish(study_id)
    stack.wait_running(studies[0])

    private_postgres.stop()  # mid-attempt: the pipeline's reads and writes will fail
    time.sleep(OUTAGE_SECONDS)
    private_postgres.start()
    returned = time.monotonic()

    wait_all_done(url, studies, workers)
    print(f"\npostgres outage: all done {time.monotonic() - returned:.1f}s after it returned")
    assert_done_once(url, studies)
