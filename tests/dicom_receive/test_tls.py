"""DICOM TLS (PS3.15 Annex B.9): mutual TLS between send_files and the listener."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from dicom_io.config import Destination, TLSConfig
from dicom_io.send import send_files
from tests.dicom_receive.dicom_receive_helpers import make_instance, write_instance


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _self_signed(name: str, cwd: Path) -> None:
    """A self-signed CA certificate ``<name>.pem`` with key ``<name>.key``."""
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("pki")
    _self_signed("ca", d)
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{name}.pem",
            cwd=d,
        )
    _self_signed("rogue", d)  # a CA nobody here trusts
    return d


@pytest.fixture
def mtls(make_listener, pki, tmp_path):
    """A listener requiring client certificates from the test CA, an instance file, its address."""
    server_tls = TLSConfig(
        pki / "server.pem", pki / "server.key", pki / "ca.pem", require_client_cert=True
    )
    listener, ready = make_listener(tls=server_tls)
    path = write_instance(make_instance(pydicom.uid.generate_uid()), tmp_path / "out")
    return listener, ready, path, Destination("PNEUMO", "127.0.0.1", listener.port)


def test_mutual_tls_accepts_trusted_client_and_refuses_others(mtls, pki):
    listener, ready, path, dest = mtls
    good = send_files(
        [path],
        dest,
        retries=0,
        tls=TLSConfig(pki / "client.pem", pki / "client.key", pki / "ca.pem"),
    )
    assert good.ok, good.failed
    [result] = ready.wait(1)
    assert result.study_uid == pydicom.dcmread(path).StudyInstanceUID

    rogue = send_files(
        [path], dest, retries=0, tls=TLSConfig(pki / "rogue.pem", pki / "rogue.key", pki / "ca.pem")
    )
    assert not rogue.ok
    plain = send_files([path], dest, retries=0)  # no TLS at all
    assert not plain.ok
    assert listener.stats["stored"] == 1


def test_sender_verifies_the_peer(mtls, pki):
    """Outbound TLS needs a CA, and a listener whose certificate it did not sign is refused."""
    listener, _, path, dest = mtls
    with pytest.raises(ValueError, match="ca_file"):
        send_files([path], dest, retries=0, tls=TLSConfig(pki / "client.pem", pki / "client.key"))
    # The client trusts only the rogue CA: the listener's certificate fails verification.
    untrusting = send_files(
        [path],
        dest,
        retries=0,
        tls=TLSConfig(pki / "client.pem", pki / "client.key", pki / "rogue.pem"),
    )
    assert not untrusting.ok
    assert listener.stats["stored"] == 0
