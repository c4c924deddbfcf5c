"""Root fixtures and skip helpers shared by every test package.

Paths live in :mod:`tests.paths`; what a test needs from the machine (DCMTK
tools, the shared data, PostgreSQL, Redis) is asked for here, once, and turns
into a skip with a reason when it is missing.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.paths import DICOM_DATA, KERMANY, SHARED

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379"


def need_dcmtk(*tools: str) -> None:
    """Skip unless each DCMTK tool exists in /usr/bin (pynetdicom's scripts shadow DCMTK's)."""
    for tool in tools:
        if not Path("/usr/bin", tool).exists():
            pytest.skip(f"DCMTK {tool} not installed")


def need_shared(path: Path = SHARED) -> Path:
    """Skip unless ``path`` (default: the shared data folder) exists."""
    if not path.exists():
        pytest.skip(f"shared data not present ({path.name})")
    return path


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serve_app(app: Any) -> Iterator[str]:
    """Serve an ASGI ``app`` with a real uvicorn on a free loopback port; yield its base URL.

    A generator: use it as a fixture body (``yield from serve_app(app)``) or
    with ``next()`` to start and ``next(gen, None)`` to stop.
    """
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def shared() -> Path:
    return need_shared(SHARED)


@pytest.fixture(scope="session")
def kermany() -> Path:
    return need_shared(KERMANY / "train")


@pytest.fixture(scope="session")
def dicom_data() -> Path:
    return need_shared(DICOM_DATA)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    if not port_open("127.0.0.1", 5432):
        pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432")
    return POSTGRES_URL


@pytest.fixture(scope="session")
def redis_server() -> str:
    if not port_open("127.0.0.1", 6379):
        pytest.skip("Redis not reachable at 127.0.0.1:6379")
    return REDIS_URL
