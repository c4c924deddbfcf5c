"""Helpers for the receive-side tests: real listeners, real DCMTK peers, loopback only."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_io.assembly import ReadyStudy
from tests.conftest import free_port
from tests.paths import DICOM_DATA

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def run_dcmtk(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*args],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
    )


def storescu(port: int, *paths: Path | str) -> subprocess.CompletedProcess:
    """DCMTK storescu to our listener on loopback, proposing only each file's own syntax (-R)."""
    return run_dcmtk(
        "/usr/bin/storescu", "-aec", "PNEUMO", "-R", "127.0.0.1", str(port), *map(str, paths)
    )


class Collector:
    """Collects ReadyStudy callbacks and lets a test wait for them."""

    def __init__(self) -> None:
        self.items: list[ReadyStudy] = []
        self.times: list[float] = []
        self._cond = threading.Condition()
        self.fail_next = 0

    def __call__(self, study: ReadyStudy) -> None:
        with self._cond:
            if self.fail_next > 0:
                self.fail_next -= 1
                raise RuntimeError("consumer not ready")
            self.items.append(study)
            self.times.append(time.monotonic())
            self._cond.notify_all()

    def wait(self, count: int = 1, timeout: float = 10.0) -> list[ReadyStudy]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.items) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {count} ready studies, got {len(self.items)}")
                self._cond.wait(left)
            return list(self.items)


def make_instance(
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    *,
    rows: int = 32,
    cols: int = 32,
    seed: int = 0,
    **attrs: object,
) -> Dataset:
    """A small synthetic DX instance (uncompressed, Explicit VR Little Endian)."""
    ds = Dataset()
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = "SECRET^PATIENT"
    ds.PatientID = "PHI-12345"
    ds.Modality = "DX"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4096, (rows, cols), dtype=np.uint16).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def write_instance(ds: Dataset, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its File Meta Information."""
    raw = path.read_bytes()
    meta = pydicom.filereader.read_file_meta_info(path)
    # group length (0002,0000) value + 12 bytes of that element + 132 preamble/prefix
    return raw[132 + 12 + int(meta.FileMetaInformationGroupLength) :]


class StoreSCP:
    """A DCMTK storescp standing in for the PACS."""

    def __init__(
        self,
        folder: Path,
        port: int | None = None,
        ae_title: str = "PACS",
        accept: str = "+xa",
    ) -> None:
        """``accept``: storescp's transfer syntax option (``+xa`` any, ``+xi`` implicit VR only)."""
        self.folder = folder
        self.port = port or free_port()
        self.ae_title = ae_title
        self.accept = accept
        self.proc: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "/usr/bin/storescp",
                self.accept,
                "-aet",
                self.ae_title,
                "-od",
                str(self.folder),
                "--fork",
                str(self.port),
            ],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = run_dcmtk("/usr/bin/echoscu", "-aec", self.ae_title, "127.0.0.1", str(self.port))
            if r.returncode == 0:
                return self
            time.sleep(0.05)
        raise RuntimeError("storescp did not come up")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None

    def received(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())


def copy_shared(names: list[str], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        src = DICOM_DATA / name
        out.append(Path(shutil.copy(src, dest / src.name)))
    return out


def scu_store(
    port: int,
    datasets: list[Dataset],
    *,
    end: str = "release",
    calling_ae: str = "TESTSCU",
    called_ae: str = "PNEUMO",
) -> list[int]:
    """Send datasets over ONE pynetdicom association; end it by ``release`` or ``abort``.

    Returns the C-STORE status of each dataset (-1 when there was no response).
    """
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    for ts_group in {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}:
        ae.add_requested_context(*ts_group)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established, "association not established"
    statuses = []
    for ds in datasets:
        status = assoc.send_c_store(ds)
        statuses.append(int(status.Status) if status else -1)
    if end == "release":
        assoc.release()
    else:
        assoc.abort()
    return statuses


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``check`` until it is true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def encode_wire(ds: Dataset, implicit: bool = False) -> bytes:
    """The data set as a sender puts it on the wire (no file meta), little endian."""
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = implicit
    write_dataset(buf, ds)
    return buf.getvalue()


DEFLATED = "1.2.840.10008.1.2.1.99"


def deflate(data: bytes) -> bytes:
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(data) + deflater.flush()


def deflate_bomb(ds: pydicom.Dataset, pixel_bytes: int) -> bytes:
    """``ds`` (no pixels) followed by ``pixel_bytes`` of zero Pixel Data, deflated in chunks.

    A few hundred KB that inflate to ``pixel_bytes``; never held inflated here.
    """
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_dataset(head, ds)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(head.getvalue())]
    # (7FE0,0010) OB, explicit VR little endian with a 32-bit length (PS3.5 §7.1.2).
    parts.append(deflater.compress(struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OB", pixel_bytes)))
    zeros = bytes(1 << 20)
    left = pixel_bytes
    while left:
        step = min(left, len(zeros))
        parts.append(deflater.compress(zeros[:step]))
        left -= step
    parts.append(deflater.flush())
    return b"".join(parts)
