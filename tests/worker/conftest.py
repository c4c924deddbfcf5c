"""Worker fixtures: real Celery worker subprocesses on the embedded broker or Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.paths import REPO
from worker import embedded_broker

REDIS_URL = "redis://127.0.0.1:6379/14"
PYTHON = sys.executable


def base_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PNEUMO_")}
    env.update(
        PNEUMO_DATA_DIR=str(data_dir),
        PNEUMO_WORKER_WARMUP="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    env.update(extra)
    return env


@pytest.fixture
def embedded_redis(tmp_path: Path) -> Iterator[Path]:
    """A data dir whose embedded ``redis-server`` runs; stopped by its pid at teardown."""
    data_dir = tmp_path / "data"
    embedded_broker.start(data_dir)
    yield data_dir
    # Whoever started it (this fixture, or a `pneumo worker` after a restart):
    # the pid file names it.
    embedded_broker.stop(data_dir)


@pytest.fixture(params=["embedded", pytest.param("redis", marks=pytest.mark.redis)])
def broker_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for one broker flavour (the database is always SQLite here)."""
    if request.param == "embedded":
        yield base_env(request.getfixturevalue("embedded_redis"))
        return
    request.getfixturevalue("redis_server")  # skips when the shared Redis is down
    import redis

    data_dir = tmp_path / "data"
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield base_env(
        data_dir,
        PNEUMO_BROKER_URL=REDIS_URL,
        PNEUMO_DATABASE_URL=f"sqlite:///{data_dir / 'pneumo.db'}",
    )
    client.flushdb()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start subprocesses that are stopped (SIGTERM, then SIGKILL) at teardown."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(
        args: list[str], env: dict[str, str], cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"proc-{uuid.uuid4().hex[:6]}.log", "wb")
        process = subprocess.Popen(
            args, env=env, cwd=cwd or tmp_path, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        process.log_path = log.name  # type: ignore[attr-defined]
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def waiter() -> Callable[[Callable[[], bool], float, str], None]:
    return wait_until
