"""Fault suite 1: workers lost mid-study.

* The whole worker (main process and pool) SIGKILLed mid-study, as when its
  host dies: a new worker finishes the study within 60 s with the default
  heartbeat and reconciler settings, not after the broker's visibility timeout.
* The pool child SIGKILLed on every attempt (a poisonous study that crashes
  its process): dead-lettered with a reason after ``task_max_retries + 1``
  attempts counted in the database; the next study is still done.

Real processes: ``pneumo worker``, a private ``redis-server``, SQLite.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from db import repository as repo
from db.engine import session_scope
from db.models import JobStatus, Study, StudyStatus
from tests.reliability.services import (
    PrivateRedis,
    Stack,
    WorkerProcesses,
    assert_done_once,
    jobs_of,
    running_job,
    status_of,
    wait_all_done,
    wait_until,
)
from worker.tasks import LOST_ATTEMPT_ERROR

pytestmark = pytest.mark.slow

HOST_LOSS_BUDGET_SECONDS = 60.0


def test_whole_worker_killed_mid_study_is_picked_up_within_a_minute(
    private_redis: PrivateRedis, workers: WorkerProcesses, tmp_path: Path
) -> None:
    stack = Stack.on_sqlite(tmp_path, private_redis.url)
    # Default heartbeat (5 s / 30 s stale) and reconciler (every 5 s) settings;
    # only the study is slowed down, so that the kill lands mid-study.
    env = stack.env(fault_test_delay_seconds="6")
    url = stack.database_url
    first = workers.start_worker(env, "doomed")
    study_id = stack.record()
    stack.publish(study_id)
    stack.wait_running(study_id)

    def beats_with_the_task() -> bool:
        job = running_job(url, study_id)
        assert job is not None and job.worker_host and job.task_id
        with session_scope(url) as session:
            beat = repo.heartbeats(session, [job.worker_host]).get(job.worker_host)
        return beat is not None and job.task_id in beat.active_tasks

    wait_until(beats_with_the_task, 10, "the worker's heartbeat to list the running task")
    workers.kill(first)  # SIGKILL to the whole process group: no goodbye, no requeue
    killed_at = time.monotonic()
    workers.start_worker(env, "rescuer")
    wait_all_done(url, [study_id], workers)
    recovered = time.monotonic() - killed_at
    print(f"\nhost loss: study done {recovered:.1f}s after the worker was SIGKILLed")

    assert recovered < HOST_LOSS_BUDGET_SECONDS, workers.logs()
    assert_done_once(url, [study_id])
    jobs = jobs_of(url, study_id)
    assert [(j.status, j.error) for j in jobs] == [
        (JobStatus.RETRYING, LOST_ATTEMPT_ERROR),
        (JobStatus.SUCCEEDED, None),
    ]
    assert jobs[0].worker_host != jobs[1].worker_host
    assert [j.attempt for j in jobs] == [0, 1]


def test_pool_child_killed_on_every_attempt_is_dead_lettered(
    private_redis: PrivateRedis, workers: WorkerProcesses, tmp_path: Path
) -> None:
    stack = Stack.on_sqlite(tmp_path, private_redis.url)
    env = stack.env(fault_test_delay_seconds="2", task_max_retries="2")
    url = stack.database_url
    worker = workers.start_worker(env, "crashy")
    poisonous, healthy = stack.record(), stack.record()
    stack.publish(poisonous)
    killed: set[int] = set()

    def kill_children_mid_attempt() -> bool:
        """Kill the pool child each time an attempt of the poisonous study runs."""
        if status_of(url, poisonous) is StudyStatus.DEAD_LETTER:
            return True
        job = running_job(url, poisonous)
        if job is not None and job.id not in killed:
            for child in psutil.Process(worker.pid).children(recursive=True):
                child.kill()
            killed.add(job.id)
        return False

    try:
        wait_until(kill_children_mid_attempt, 120, "the poisonous study dead-lettered")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{workers.logs()}") from exc
    stack.publish(healthy)
    wait_all_done(url, [healthy], workers)

    assert worker.poll() is None, "the worker main process survived its children"
    assert_done_once(url, [healthy])
    jobs = jobs_of(url, poisonous)
    assert len(jobs) == 3 == len(killed)  # task_max_retries + 1, counted in the database
    assert all(j.status is JobStatus.RETRYING and j.error == LOST_ATTEMPT_ERROR for j in jobs)
    with session_scope(url) as session:
        study = session.get(Study, poisonous)
        assert study is not None and study.last_error is not None
        assert "dead-letter after 3 attempt(s)" in study.last_error
        assert "WorkerLost" in study.last_error


def test_time_limit_is_a_recorded_failure(
    private_redis: PrivateRedis, workers: WorkerProcesses, tmp_path: Path
) -> None:
    """An attempt over the time limit is recorded (not acknowledged silently), then dead-lettered."""
    stack = Stack.on_sqlite(tmp_path, private_redis.url)
    env = stack.env(
        fault_test_delay_seconds="30", task_time_limit_seconds="10", task_max_retries="0"
    )
    url = stack.database_url
    workers.start_worker(env, "slow")
    study_id = stack.record()
    stack.publish(study_id)

    def dead() -> bool:
        return status_of(url, study_id) is StudyStatus.DEAD_LETTER

    try:
        wait_until(dead, 90, "the study over its time limit dead-lettered")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{workers.logs()}") from exc
    (job,) = jobs_of(url, study_id)
    assert job.status is JobStatus.DEAD_LETTER
    assert job.error is not None and job.error.startswith("SoftTimeLimitExceeded")
