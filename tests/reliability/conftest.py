"""Fixtures for the fault suite: real file systems, processes and services to break.

Faults are injected into private resources only (a tmpfs of our own, private
service instances on their own ports), never into the machine's shared
PostgreSQL or Redis.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# The end-to-end stack's fixtures (processes stopped at teardown, a DCMTK
# storescp PACS, the model weights check), for the fault tests that run it.
from tests.e2e.conftest import pacs, predictor, procs  # noqa: F401
from tests.reliability.services import PrivatePostgres, PrivateRedis, WorkerProcesses


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs, mounted privately for one test: ENOSPC is the kernel's."""
    mount_point = tmp_path / f"fs-{uuid.uuid4().hex[:8]}"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'not root'})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(fs: Path, leave_bytes: int) -> Path:
    """Write a ballast file so that about ``leave_bytes`` stay free on ``fs``."""
    stat = os.statvfs(fs)
    free = stat.f_bavail * stat.f_frsize
    ballast = fs / "ballast"
    with open(ballast, "wb") as handle:
        handle.truncate(0)
        chunk = b"\0" * (1 << 20)
        left = max(0, free - leave_bytes)
        while left > 0:
            left -= handle.write(chunk[: min(len(chunk), left)])
        handle.flush()
        os.fsync(handle.fileno())
    return ballast


# --- private services and workers (tests.reliability.services) ----------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A running ``redis-server`` of this test's own (append-only), stopped at teardown."""
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A running PostgreSQL cluster of this test's own, destroyed at teardown."""
    cluster = PrivatePostgres()
    try:
        cluster.init()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[WorkerProcesses]:
    """Start ``pneumo worker`` processes; every one is stopped at teardown."""
    processes = WorkerProcesses(tmp_path)
    yield processes
    processes.close()
