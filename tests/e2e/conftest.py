"""End-to-end fixtures: free ports, a DCMTK storescp "PACS", throwaway Redis and
PostgreSQL, and `pneumo` processes that are always stopped at teardown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.conftest import free_port, need_dcmtk, need_shared
from tests.conftest import port_open as _port_open
from tests.db.postgres import throwaway_database
from tests.paths import SHARED
from worker import embedded_broker

REDIS_URL = "redis://127.0.0.1:6379/15"
DCMTK = Path("/usr/bin")


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def port_open(port: int) -> bool:
    return _port_open("127.0.0.1", port, timeout=0.5)


@dataclass
class Processes:
    """Subprocesses started by a test; stopped with SIGTERM (then SIGKILL) at teardown."""

    root: Path
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "wb")
        process = subprocess.Popen(
            args,
            env=env,
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        process.log_path = self.root / f"{name}.log"  # type: ignore[attr-defined]
        self.started.append(process)
        return process

    def stop(
        self, process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20
    ) -> int:
        if process.poll() is None:
            process.send_signal(sig)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise AssertionError(f"{process.args[:4]} did not stop within {timeout}s") from exc

    def close(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.terminate()
        for process in self.started:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            try:  # pool children left behind by a killed parent
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        # Embedded brokers (redis-server daemons) started by `pneumo listen` or
        # `pneumo worker`: they outlive those processes; stop them by their pid.
        for pid_file in self.root.rglob(embedded_broker.PID_NAME):
            embedded_broker.stop(pid_file.parent)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path)
    yield p
    p.close()


@pytest.fixture
def shared_data() -> Path:
    need_shared(SHARED / "dicom" / "cxr")
    return SHARED


@pytest.fixture
def predictor():  # type: ignore[no-untyped-def]
    inference = pytest.importorskip("model.inference")
    try:
        return inference.load_predictor()
    except inference.WeightsError:
        pytest.skip("no model weights yet")


@dataclass(frozen=True)
class Pacs:
    ae_title: str
    port: int
    out_dir: Path

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def received(self) -> list[Path]:
        return sorted(p for p in self.out_dir.rglob("*") if p.is_file())


@pytest.fixture
def pacs(procs: Processes, tmp_path: Path) -> Pacs:
    """A DCMTK storescp standing in for the PACS that receives our SR and SC objects."""
    need_dcmtk("storescp")
    out_dir = tmp_path / "pacs"
    out_dir.mkdir()
    port = free_port()
    env = dict(os.environ, TCP_NODELAY="1")
    procs.start(
        "storescp",
        [str(DCMTK / "storescp"), "--fork", "-aet", "PACS", "-od", str(out_dir), "+xa", str(port)],
        env,
    )
    wait_until(lambda: port_open(port), 10, "storescp to listen")
    return Pacs("PACS", port, out_dir)


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """Redis database 15 of the shared server, flushed before and after."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


@pytest.fixture
def pg_url(postgres_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database, dropped afterwards."""
    with throwaway_database(postgres_url) as url:
        yield url


def pneumo_env(data_dir: Path, port: int, pacs: Pacs, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PNEUMO_")}
    env.update(
        PNEUMO_DATA_DIR=str(data_dir),
        PNEUMO_HOST="127.0.0.1",
        PNEUMO_PORT=str(port),
        PNEUMO_STUDY_QUIET_SECONDS="0.5",
        PNEUMO_STUDY_RELEASE_GRACE_SECONDS="0.2",
        PNEUMO_DESTINATIONS=pacs.destination,
        PNEUMO_SEND_BACKOFF_SECONDS="0.5",
        TCP_NODELAY="1",
    )
    env.update(extra)
    return env


def pneumo(*args: str) -> list[str]:
    return [sys.executable, "-m", "pneumo.cli", *args]


def storescu(port: int, files: list[Path]) -> subprocess.CompletedProcess[str]:
    """Send files with DCMTK storescu in one association.

    -R proposes only the SOP classes of the files (needed beyond storescu's
    default list); -xw adds JPEG 2000 to the proposals, without which storescu
    3.6.7 tries to convert the J2K file to Explicit VR and fails.
    """
    return subprocess.run(
        [
            str(DCMTK / "storescu"),
            "-R",
            "-xw",
            "-aet",
            "MODALITY",
            "-aec",
            "PNEUMO",
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TCP_NODELAY="1"),
    )


def dsrdump(path: Path) -> str:
    return subprocess.run(
        [str(DCMTK / "dsrdump"), str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, TCP_NODELAY="1"),
    ).stdout


def logs(root: Path) -> str:
    """All process logs of a test, for assertion messages."""
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(root.glob("*.log"))
    )


DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def kermany_to_dicom(jpeg: Path, out: Path, study_uid: str, accession: str) -> Path:
    """An 8-bit MONOCHROME2 DX chest PA from a Kermany JPEG, synthetic child patient."""
    pixels = np.asarray(Image.open(jpeg).convert("L"), dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(out), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientName = "Synthetic^Child"
    ds.PatientID = f"SYN-{accession}"
    ds.PatientAge = "005Y"
    ds.PatientSex = "O"
    ds.AccessionNumber = accession
    ds.StudyDate = date.today().strftime("%Y%m%d")
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ReferringPhysicianName = ""
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture
def e2e() -> SimpleNamespace:
    """The helper functions above, for test modules (conftest is not importable)."""
    return SimpleNamespace(
        free_port=free_port,
        wait_until=wait_until,
        port_open=port_open,
        pneumo=pneumo,
        pneumo_env=pneumo_env,
        storescu=storescu,
        dsrdump=dsrdump,
        logs=logs,
        kermany_to_dicom=kermany_to_dicom,
    )
