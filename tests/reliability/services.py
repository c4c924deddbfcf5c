"""Private services and worker processes for the fault suite, to be broken on purpose.

Each test gets its own ``redis-server`` and, when it needs one, its own
PostgreSQL cluster (``initdb`` + ``pg_ctl`` as the ``postgres`` user), on free
ports, under a temporary folder; these helpers stop, kill and flush those
only, never the machine's shared services on 5432/6379.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.engine import get_engine, session_scope
from db.models import Job, JobKind, JobStatus, Result, Study, StudyStatus
from tests.conftest import free_port, port_open
from tests.e2e.conftest import Processes, logs
from tests.paths import REPO

__all__ = [
    "PrivatePostgres",
    "PrivateRedis",
    "Stack",
    "WorkerProcesses",
    "assert_done_once",
    "free_port",
    "jobs_of",
    "running_job",
    "status_of",
    "wait_all_done",
    "wait_until",
    "worker_env",
]


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> float:
    """Poll ``predicate`` until true; the seconds it took. Raises AssertionError on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if predicate():
                return time.monotonic() - start
        except Exception:  # a service being broken on purpose: ask again
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass
class PrivateRedis:
    """A ``redis-server`` of our own: TCP on a free port, append-only file in ``directory``."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server not installed")
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / "redis.log", "ab")
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "yes", "--dir", str(self.directory)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        wait_until(lambda: port_open("127.0.0.1", self.port, 0.2), 10, "redis-server to listen")

    def kill(self) -> None:
        """SIGKILL, as a crash would (only our own process)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def flushall(self) -> None:
        import redis

        redis.Redis(host="127.0.0.1", port=self.port).flushall()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _pg_bin(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    if not found:
        pytest.skip(f"PostgreSQL {tool} not installed")
    return found[-1]


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of our own, run as the ``postgres`` user (initdb refuses root)."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pneumo-pg-")))
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *args: str, timeout: float = 60) -> None:
        command = list(args)
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stderr[-500:]}")

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        os.chmod(self.root, 0o700)
        try:
            self._as_postgres(
                _pg_bin("initdb"), "-D", str(self.root / "data"), "-A", "trust", "-U", "postgres"
            )
        except (RuntimeError, FileNotFoundError) as exc:
            pytest.skip(f"cannot initdb a private cluster: {exc}")
        self.start()

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(
            _pg_bin("pg_ctl"), "-D", str(self.root / "data"), "-o", options,
            "-l", str(self.root / "postgres.log"), "-w", "start",
        )  # fmt: skip

    def stop(self) -> None:
        self._as_postgres(
            _pg_bin("pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-w", "stop"
        )

    def destroy(self) -> None:
        try:
            self.stop()
        except Exception:
            pass
        get_engine.cache_clear()
        shutil.rmtree(self.root, ignore_errors=True)


class WorkerProcesses(Processes):
    """``pneumo worker`` processes started by a test; killed (whole group) at teardown."""

    def start_worker(self, env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
        """A one-process worker with a unique Celery node name, logging to ``<name>.log``."""
        args = [sys.executable, "-m", "pneumo.cli", "worker", "--concurrency", "1",
                "--hostname", f"{name}@{uuid.uuid4().hex[:6]}"]  # fmt: skip
        return self.start(name, args, env)

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        """SIGKILL the whole worker: main process and pool children (a host that died)."""
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(10)

    def logs(self) -> str:
        return logs(self.root)


def worker_env(data_dir: Path, **settings: str) -> dict[str, str]:
    """The environment of a test worker: our settings only, the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PNEUMO_")}
    env.update(
        PNEUMO_DATA_DIR=str(data_dir),
        PNEUMO_TORCH_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    env.update({f"PNEUMO_{k.upper()}": v for k, v in settings.items()})
    return env


def status_of(url: str, study_id: int) -> StudyStatus:
    with session_scope(url) as session:
        study = session.get(Study, study_id)
        assert study is not None
        return study.status


def jobs_of(url: str, study_id: int) -> list[Job]:
    with session_scope(url) as session:
        return list(
            session.execute(
                select(Job)
                .where(Job.study_id == study_id, Job.kind == JobKind.PROCESS)
                .order_by(Job.id)
            ).scalars()
        )


def running_job(url: str, study_id: int) -> Job | None:
    jobs = [j for j in jobs_of(url, study_id) if j.status is JobStatus.RUNNING]
    return jobs[-1] if jobs else None


def assert_done_once(url: str, study_ids: list[int]) -> None:
    """Every study ``done``, with exactly one result row for its revision."""
    with session_scope(url) as session:
        for study_id in study_ids:
            study = session.get(Study, study_id)
            assert study is not None
            assert study.status is StudyStatus.DONE, (study_id, study.status, study.last_error)
            results = session.execute(
                select(func.count()).where(
                    Result.study_id == study_id, Result.revision == study.revision
                )
            ).scalar_one()
            assert results == 1, (study_id, results)


@dataclass
class Stack:
    """The test's view of a deployment: its settings, a publishing Celery app, its studies."""

    data_dir: Path
    database_url: str
    broker_url: str

    def __post_init__(self) -> None:
        from db import migrate
        from pneumo.settings import Settings
        from worker.app import create_app

        migrate.upgrade(self.database_url)
        self.settings = Settings(
            data_dir=self.data_dir, database_url=self.database_url, broker_url=self.broker_url
        )
        self.config = self.settings.worker_config()
        self.app = create_app(self.config)

    @classmethod
    def on_sqlite(cls, tmp_path: Path, broker_url: str) -> Stack:
        """A stack whose database is a SQLite file under ``tmp_path``."""
        return cls(tmp_path / "data", f"sqlite:///{tmp_path / 'pneumo.db'}", broker_url)

    def wait_running(self, study_id: int, timeout: float = 90) -> None:
        """Wait until an attempt of the study runs (a worker has started it)."""
        wait_until(lambda: running_job(self.database_url, study_id), timeout, "an attempt to start")

    def env(self, **settings: str) -> dict[str, str]:
        return worker_env(
            self.data_dir, database_url=self.database_url, broker_url=self.broker_url, **settings
        )

    def record(self) -> int:
        """One new single-image chest study recorded as the listener does (not published)."""
        from tests.conftest import need_shared
        from tests.worker.studies import CXR, record_study

        need_shared(CXR)
        return record_study(self.config, [CXR]).study_id

    def publish(self, study_id: int) -> None:
        from worker.app import PROCESS_STUDY

        with session_scope(self.database_url) as session:
            revision = session.get(Study, study_id).revision  # type: ignore[union-attr]
        self.app.send_task(PROCESS_STUDY, args=[study_id, revision], queue="realtime")


def wait_all_done(
    url: str, study_ids: list[int], workers: WorkerProcesses, timeout: float = 90
) -> float:
    """Wait until every study is ``done``; the seconds it took. The workers' logs on failure."""

    def all_done() -> bool:
        return all(status_of(url, s) is StudyStatus.DONE for s in study_ids)

    try:
        return wait_until(all_done, timeout, f"{len(study_ids)} study(ies) done")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{workers.logs()}") from exc
