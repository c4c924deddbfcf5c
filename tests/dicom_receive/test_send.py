"""Sending to a DCMTK storescp standing in for the PACS."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom.dsutils import split_dataset

from dicom_io.config import Destination
from dicom_io.send import send_files
from tests.conftest import need_dcmtk
from tests.dicom_receive.dicom_receive_helpers import (
    DCMTK_ENV,
    StoreSCP,
    copy_shared,
    free_port,
    make_instance,
    run_dcmtk,
    write_instance,
)
from tests.paths import REPO

pytestmark = pytest.mark.dcmtk


def _received_sops(scp: StoreSCP) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in scp.received()}


def test_send_files_and_folders_including_sr(storescp, dicom_data, tmp_path):
    need_dcmtk("dsrdump")
    files = copy_shared(["other/test-SR.dcm", "cxr/RG1_J2KI.dcm"], tmp_path / "out")
    folder = tmp_path / "folder"
    study = pydicom.uid.generate_uid()
    made = [write_instance(make_instance(study, seed=i), folder / "sub") for i in range(3)]
    (folder / ".hidden").write_text("ignored")

    result = send_files(
        [*files, folder],
        Destination("PACS", "127.0.0.1", storescp.port),
        calling_ae="PNEUMO",
        retries=1,
        backoff_seconds=0.1,
    )
    assert result.ok and result.failed == () and result.attempts == 1
    assert set(result.sent) == set(files) | set(made)
    expected = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in [*files, *made]
    }
    assert _received_sops(storescp) == expected
    assert all(p.exists() for p in [*files, *made])  # nothing deleted

    # The SR as the PACS stored it reads back with DCMTK's SR dumper.
    sr_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
    [sr_file] = [p for p in storescp.received() if p.name.startswith("SR")] or [
        p
        for p in storescp.received()
        if str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) == sr_uid
    ]
    dump = run_dcmtk("/usr/bin/dsrdump", str(sr_file))
    assert dump.returncode == 0, dump.stderr
    original = run_dcmtk("/usr/bin/dsrdump", str(files[0]))
    assert dump.stdout.startswith("Comprehensive SR Document")
    assert '<contains NUM:(,,"Diameter")="3"' in dump.stdout  # a measurement survived
    assert dump.stdout == original.stdout  # and the whole document is unchanged


def _data_set_bytes(path: Path) -> bytes:
    """The bytes after the File Meta Information of a Part 10 file."""
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def test_files_go_as_stored_or_converted_to_what_the_peer_accepts(dicom_data, tmp_path):
    """A peer accepting the file's transfer syntax gets the data set bytes exactly as
    stored; a peer accepting only Implicit VR Little Endian gets a converted copy."""
    study = pydicom.uid.generate_uid()
    made = [write_instance(make_instance(study, seed=i), tmp_path / "out") for i in range(2)]
    assert all(
        pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID
        == pydicom.uid.ExplicitVRLittleEndian
        for p in made
    )
    for accept, syntax in (
        ("+xe", pydicom.uid.ExplicitVRLittleEndian),
        ("+xi", pydicom.uid.ImplicitVRLittleEndian),
    ):
        scp = StoreSCP(tmp_path / f"pacs{accept}", accept=accept).start()
        try:
            result = send_files(made, Destination("PACS", "127.0.0.1", scp.port), retries=0)
            assert result.ok, result.failed
            received = {
                str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                for p in scp.received()
            }
        finally:
            scp.stop()
        for original in made:
            ours = pydicom.dcmread(original)
            theirs_path = received[str(ours.SOPInstanceUID)]
            theirs = pydicom.dcmread(theirs_path)
            assert theirs.file_meta.TransferSyntaxUID == syntax
            assert theirs.PixelData == ours.PixelData
            if syntax == ours.file_meta.TransferSyntaxUID:
                assert _data_set_bytes(theirs_path) == _data_set_bytes(original)


def test_retry_with_backoff_until_destination_comes_up(tmp_path):
    need_dcmtk("storescp", "echoscu")
    port = free_port()
    scp = StoreSCP(tmp_path / "pacs", port=port)
    ds = make_instance(pydicom.uid.generate_uid())
    path = write_instance(ds, tmp_path / "out")
    starter = threading.Timer(0.6, scp.start)
    starter.start()
    try:
        t0 = time.monotonic()
        result = send_files(
            [path], Destination("PACS", "127.0.0.1", port), retries=5, backoff_seconds=0.3
        )
        elapsed = time.monotonic() - t0
    finally:
        starter.join()
        scp.stop()
    assert result.ok and result.sent == (path,)
    assert result.attempts >= 2  # first attempt(s) hit a closed port
    assert elapsed >= 0.3  # we actually waited between attempts
    assert _received_sops(scp) == {str(ds.SOPInstanceUID)}


def test_failure_reported_when_destination_never_comes_up(tmp_path):
    port = free_port()
    paths = [
        write_instance(make_instance(pydicom.uid.generate_uid(), seed=i), tmp_path / "out")
        for i in range(2)
    ]
    junk = tmp_path / "out" / "notes.txt"
    junk.write_text("not DICOM")
    t0 = time.monotonic()
    result = send_files(
        [tmp_path / "out"], Destination("PACS", "127.0.0.1", port), retries=2, backoff_seconds=0.1
    )
    elapsed = time.monotonic() - t0
    assert not result.ok and result.sent == ()
    assert result.attempts == 3
    assert elapsed >= 0.1 + 0.2  # backoff doubled between attempts
    reasons = dict(result.failed)
    assert set(reasons) == set(paths) | {junk}
    assert reasons[junk].startswith("not a readable DICOM file")
    assert all(reasons[p] == "association failed" for p in paths)
    assert all(p.exists() for p in paths)


def test_rejected_status_is_reported_per_file(make_listener, tmp_path):
    """A peer answering an error status: that file fails, the others are sent."""
    listener, _ = make_listener()
    good = write_instance(make_instance(pydicom.uid.generate_uid()), tmp_path / "out")
    bad = write_instance(make_instance("1.2.3.abc"), tmp_path / "out")
    result = send_files(
        [good, bad],
        Destination("PNEUMO", "127.0.0.1", listener.port),
        retries=1,
        backoff_seconds=0.05,
    )
    assert result.sent == (good,)
    assert result.failed == ((bad, "status 0xA900"),)
    assert result.attempts == 2  # only the failed one was retried


def test_pneumo_send_cli(storescp, tmp_path):
    folder = tmp_path / "out"
    study = pydicom.uid.generate_uid()
    datasets = [make_instance(study, seed=i) for i in range(2)]
    for ds in datasets:
        write_instance(ds, folder)
    pneumo = Path(sys.executable).with_name("pneumo")
    env = {**DCMTK_ENV, "PNEUMO_DATA_DIR": str(tmp_path / "var")}
    ok = subprocess.run(
        [str(pneumo), "send", str(folder), "--to", f"PACS@127.0.0.1:{storescp.port}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "sent 2, failed 0" in ok.stdout
    assert _received_sops(storescp) == {str(d.SOPInstanceUID) for d in datasets}

    down = subprocess.run(
        [
            str(pneumo),
            "send",
            str(folder),
            "--to",
            f"PACS@127.0.0.1:{free_port()}",
            "--retries",
            "0",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert down.returncode == 1
    assert "failed 2" in down.stdout

    bad = subprocess.run(
        [str(pneumo), "send", str(folder), "--to", "nonsense"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert bad.returncode == 2 and "AE@host:port" in bad.stderr
