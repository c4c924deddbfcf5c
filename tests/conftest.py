"""Root fixtures and skip helpers shared by every test package.

Paths live in :mod:`tests.paths`; what a test needs from the machine (DCMTK
tools, the shared data, PostgreSQL, Redis) is asked for here, once, and turns
into a skip with a reason when it is missing.
"""

from __future__ import annotations

import socket
from pathlib import Path

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
