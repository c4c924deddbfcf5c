"""Retrieve fixtures: a private DCMTK ``dcmqrscp`` and a private Orthanc as the PACS.

Each PACS runs as a subprocess on free loopback ports with its files in
``tmp_path`` and is stopped at teardown. Studies are synthetic: a shared chest
radiograph (or its JPEG 2000 sibling) copied with new UIDs and no patient data.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_io.retrieve import PacsAddress
from tests.conftest import free_port, need_dcmtk, need_shared, port_open
from tests.paths import DICOM_DATA

CXR = DICOM_DATA / "cxr" / "udacity_aihcnd_test1.dcm"
"""Implicit VR Little Endian chest radiograph (Secondary Capture)."""
CXR_J2K = DICOM_DATA / "cxr" / "RG1_J2KI.dcm"
"""A JPEG 2000 radiograph: a PACS that cannot transcode must send it as stored."""
ORTHANC = Path("/usr/sbin/Orthanc")
_ENV = dict(os.environ, TCP_NODELAY="1")


@dataclass(frozen=True)
class SyntheticStudy:
    study_uid: str
    files: tuple[Path, ...]
    sop_uids: tuple[str, ...]
    series_uids: tuple[str, ...]


def make_study(
    out_dir: Path, sources: list[Path], *, series: int = 1, study_uid: str | None = None
) -> SyntheticStudy:
    """Copies of ``sources`` as one new study (``series`` series, round robin), no patient data."""
    need_shared(DICOM_DATA / "cxr")
    study_uid = study_uid or generate_uid()
    series_uids = [generate_uid() for _ in range(series)]
    out_dir.mkdir(parents=True, exist_ok=True)
    files, sops = [], []
    for n, source in enumerate(sources):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uids[n % series]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Synthetic^Retrieve", "SYN-R", ""
        ds.AccessionNumber = "R1"
        ds.InstanceNumber = n + 1
        path = out_dir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        sops.append(str(ds.SOPInstanceUID))
    return SyntheticStudy(study_uid, tuple(files), tuple(sops), tuple(series_uids))


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class DcmQrScp:
    """A DCMTK ``dcmqrscp`` (Query/Retrieve SCP, C-FIND/C-GET/C-MOVE) with one storage area."""

    root: Path
    ae_title: str = "PACS"
    port: int = field(default_factory=free_port)
    move_destinations: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> PacsAddress:
        return PacsAddress(self.ae_title, "127.0.0.1", self.port)

    @property
    def storage(self) -> Path:
        return self.root / "db"

    def load(self, files: tuple[Path, ...] | list[Path]) -> None:
        """Copy ``files`` into the storage area and index them with ``dcmqridx``."""
        self.storage.mkdir(parents=True, exist_ok=True)
        copies = []
        for f in files:
            copy = self.storage / f.name
            shutil.copyfile(f, copy)
            copies.append(str(copy))
        subprocess.run(
            ["/usr/bin/dcmqridx", str(self.storage), *copies],
            check=True,
            capture_output=True,
            timeout=60,
            env=_ENV,
        )

    def start(self) -> DcmQrScp:
        self.storage.mkdir(parents=True, exist_ok=True)
        hosts = "\n".join(
            f"peer{n} = ({aet}, 127.0.0.1, {port})"
            for n, (aet, port) in enumerate(self.move_destinations.items())
        )
        config = self.root / "dcmqrscp.cfg"
        config.write_text(
            f"NetworkTCPPort = {self.port}\n"
            "MaxPDUSize = 16384\nMaxAssociations = 16\n\n"
            f"HostTable BEGIN\n{hosts}\nHostTable END\n\n"
            "VendorTable BEGIN\nVendorTable END\n\n"
            f"AETable BEGIN\n{self.ae_title} {self.storage} RW (100, 1024mb) ANY\nAETable END\n"
        )
        log = open(self.root / "dcmqrscp.log", "wb")
        self.process = subprocess.Popen(
            ["/usr/bin/dcmqrscp", "-dhl", "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_ENV,
            cwd=self.root,
        )
        _wait(lambda: port_open("127.0.0.1", self.port, 0.3), 10, "dcmqrscp to listen")
        return self

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)


@pytest.fixture
def dcmqrscp(tmp_path: Path) -> Iterator[Callable[..., DcmQrScp]]:
    """Start a ``dcmqrscp`` with given files (and C-MOVE destinations ``{AE: port}``)."""
    need_dcmtk("dcmqrscp", "dcmqridx")
    started: list[DcmQrScp] = []

    def start(files: list[Path], move_destinations: dict[str, int] | None = None) -> DcmQrScp:
        scp = DcmQrScp(
            tmp_path / f"dcmqrscp{len(started)}", move_destinations=dict(move_destinations or {})
        )
        scp.root.mkdir()
        scp.load(files)
        started.append(scp)
        return scp.start()

    yield start
    for scp in started:
        scp.stop()


@dataclass
class Orthanc:
    """A private Orthanc (DICOM Q/R SCP) with its storage and index in ``root``."""

    root: Path
    ae_title: str = "ORTHANC"
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> PacsAddress:
        return PacsAddress(self.ae_title, "127.0.0.1", self.dicom_port)

    def start(self, modalities: dict[str, int]) -> Orthanc:
        config = {
            "Name": "pneumo-test",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {
                aet.lower(): [aet, "127.0.0.1", port] for aet, port in modalities.items()
            },
            "Plugins": [],
            "StorageCompression": False,
            "HttpsVerifyPeers": False,
        }
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(config))
        log = open(self.root / "orthanc.log", "wb")
        self.process = subprocess.Popen(
            [str(ORTHANC), str(path)], stdout=log, stderr=subprocess.STDOUT, env=_ENV, cwd=self.root
        )
        _wait(lambda: port_open("127.0.0.1", self.dicom_port, 0.3), 30, "Orthanc to listen")
        _wait(lambda: port_open("127.0.0.1", self.http_port, 0.3), 30, "Orthanc's HTTP server")
        return self

    def upload(self, files: tuple[Path, ...] | list[Path]) -> None:
        """POST each file to ``/instances`` (Orthanc's REST API)."""
        for f in files:
            request = urllib.request.Request(
                f"http://127.0.0.1:{self.http_port}/instances",
                data=f.read_bytes(),
                headers={"Content-Type": "application/dicom"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == 200, response.status

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    """Start a private Orthanc that knows ``{AE: port}`` as C-MOVE destinations."""
    if not ORTHANC.exists():
        pytest.skip("Orthanc not installed (scripts/test installs it)")
    started: list[Orthanc] = []

    def start(modalities: dict[str, int] | None = None) -> Orthanc:
        root = tmp_path / f"orthanc{len(started)}"
        root.mkdir()
        server = Orthanc(root)
        started.append(server)
        return server.start(dict(modalities or {}))

    yield start
    for server in started:
        server.stop()


# A migrated throwaway PostgreSQL database and real worker subprocesses, as the batch tests use.
from tests.batches.conftest import pg_url  # noqa: E402, F401
from tests.worker.conftest import spawn  # noqa: E402, F401
