"""Fault suite 3: the broker loses wake-ups; the database still knows the work.

* Redis killed and restarted (append-only file) while a worker processes:
  queued messages survive, and a task cancelled on the connection loss is
  found by the reconciler (its worker beats without it) and re-published.
* ``FLUSHALL`` after the studies were published: every message is gone; the
  reconciler re-publishes the ``queued`` studies once they are stale and the
  queues are empty.
* A delivery whose task gave up while the PACS was down (its wake-ups are
  over): the reconciler re-publishes it, and the PACS gets one SR.

Each ends with every study done exactly once. Real processes: a private
``redis-server``, ``pneumo worker``, SQLite.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from db.engine import session_scope
from db.models import Delivery, DeliveryStatus, Job, JobKind, JobStatus
from tests.conftest import need_dcmtk
from tests.reliability.services import (
    PrivateRedis,
    Stack,
    WorkerProcesses,
    assert_done_once,
    free_port,
    wait_all_done,
    wait_until,
)

pytestmark = pytest.mark.slow


def test_redis_restarted_mid_processing(
    private_redis: PrivateRedis, workers: WorkerProcesses, tmp_path: Path
) -> None:
    stack = Stack.on_sqlite(tmp_path, private_redis.url)
    env = stack.env(fault_test_delay_seconds="2", reconcile_stale_seconds="5")
    url = stack.database_url
    studies = [stack.record() for _ in range(3)]
    workers.start_worker(env, "survivor")
    for study_id in studies:
        stack.publish(study_id)
    stack.wait_running(studies[0])
    time.sleep(1.5)  # the append-only file is fsynced every second

    private_redis.kill()
    time.sleep(2)
    private_redis.start()

    wait_all_done(url, studies, workers)
    assert_done_once(url, studies)


def test_flushall_after_publishing_is_reconciled(
    private_redis: PrivateRedis, workers: WorkerProcesses, tmp_path: Path
) -> None:
    stack = Stack.on_sqlite(tmp_path, private_redis.url)
    env = stack.env(reconcile_stale_seconds="3")
    url = stack.database_url
    studies = [stack.record() for _ in range(3)]
    for study_id in studies:
        stack.publish(study_id)
    private_redis.flushall()  # every wake-up gone before any worker saw it
    workers.start_worker(env, "reconciling")
    wait_all_done(url, studies, workers)
    assert_done_once(url, studies)


def test_delivery_failed_while_the_pacs_was_down_is_reconciled(
    private_redis: PrivateRedis, workers: WorkerProcesses, tmp_path: Path
) -> None:
    """The PACS down until the delivery's own retries are used up: the reconciler sends it later."""
    need_dcmtk("storescp")
    port = free_port()
    stack = Stack.on_sqlite(tmp_path, private_redis.url)
    env = stack.env(
        destinations=f"PACS@127.0.0.1:{port}",
        send_retries="1",
        send_backoff_seconds="0.2",
        reconcile_stale_seconds="3",
    )
    url = stack.database_url
    study_id = stack.record()
    workers.start_worker(env, "sender")
    stack.publish(study_id)
    wait_all_done(url, [study_id], workers)

    def given_up() -> bool:  # the task's own attempts are over; only the reconciler is left
        with session_scope(url) as session:
            jobs = session.execute(select(Job.status).where(Job.kind == JobKind.DELIVER)).scalars()
            return JobStatus.DEAD_LETTER in set(jobs)

    wait_until(given_up, 60, "the delivery task to give up")
    received = tmp_path / "pacs"
    received.mkdir()
    pacs = subprocess.Popen(
        ["/usr/bin/storescp", "-aet", "PACS", "-od", str(received), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: delivery_sent(url), 60, "the delivery re-published and sent")
    finally:
        pacs.terminate()
        pacs.wait(10)
    sr = [p for p in received.iterdir() if p.name.startswith("SR")]
    assert len(sr) == 1, sorted(p.name for p in received.iterdir())


def delivery_sent(url: str) -> bool:
    with session_scope(url) as session:
        return session.execute(select(Delivery.status)).scalar_one() is DeliveryStatus.SENT
