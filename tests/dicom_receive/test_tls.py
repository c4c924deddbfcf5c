"""DICOM TLS (PS3.15 Annex B.9): mutual TLS between send_files and the listener."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from dicom_io.config import Destination, TLSConfig
from dicom_io.send import send_files

from dicom_receive_helpers import make_instance, write_instance


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", cwd=d)
    # A client certificate from a CA the listener does not trust.
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=rogue",
             "-keyout", "rogue.key", "-out", "rogue.pem", cwd=d)
    return d


def test_mutual_tls_accepts_trusted_client_and_refuses_others(make_listener, pki, tmp_path):
    server_tls = TLSConfig(pki / "server.pem", pki / "server.key", pki / "ca.pem",
                           require_client_cert=True)
    listener, ready = make_listener(tls=server_tls)
    study = pydicom.uid.generate_uid()
    path = write_instance(make_instance(study), tmp_path / "out")
    dest = Destination("PNEUMO", "127.0.0.1", listener.port)

    good = send_files([path], dest, retries=0,
                      tls=TLSConfig(pki / "client.pem", pki / "client.key", pki / "ca.pem"))
    assert good.ok, good.failed
    [result] = ready.wait(1)
    assert result.study_uid == study

    rogue = send_files([path], dest, retries=0,
                       tls=TLSConfig(pki / "rogue.pem", pki / "rogue.key", pki / "ca.pem"))
    assert not rogue.ok
    plain = send_files([path], dest, retries=0)  # no TLS at all
    assert not plain.ok
    assert listener.stats["stored"] == 1
