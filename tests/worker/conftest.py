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

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/14"


def redis_available() -> bool:
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
        return True
    except Exception:
        return False


def base_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PNEUMO_")}
    env.update(
        PNEUMO_DATA_DIR=str(data_dir),
        PNEUMO_WORKER_WARMUP="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    env.update(extra)
    return env


@pytest.fixture(params=["embedded", pytest.param("redis", marks=pytest.mark.redis)])
def broker_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for one broker flavour (the database is always SQLite here)."""
    data_dir = tmp_path / "data"
    if request.param == "embedded":
        yield base_env(data_dir)
        return
    if not redis_available():
        pytest.skip("Redis not reachable at 127.0.0.1:6379")
    import redis

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

    def start(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"proc-{uuid.uuid4().hex[:6]}.log", "wb")
        process = subprocess.Popen(
            args, env=env, cwd=cwd or tmp_path, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
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


PYTHON = sys.executable


@pytest.fixture
def waiter() -> Callable[[Callable[[], bool], float, str], None]:
    return wait_until
