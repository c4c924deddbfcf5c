"""ListenerConfig refuses insecure or meaningless settings, naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_io.config import ALLOW_ANY_AE, ListenerConfig, TLSConfig


def test_loopback_with_empty_allow_list_accepts_any(tmp_path: Path) -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        config = ListenerConfig(spool_dir=tmp_path, host=host)
        assert config.allows_any_calling_ae
    assert ListenerConfig(spool_dir=tmp_path).host == "127.0.0.1"  # the default binds loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "pacs-gateway.local"])
def test_beyond_loopback_an_allow_list_is_required(tmp_path: Path, host: str) -> None:
    with pytest.raises(ValueError, match="allowed_aets"):
        ListenerConfig(spool_dir=tmp_path, host=host)
    listed = ListenerConfig(spool_dir=tmp_path, host=host, allowed_aets=frozenset({"PACS"}))
    assert not listed.allows_any_calling_ae
    anyone = ListenerConfig(spool_dir=tmp_path, host=host, allowed_aets=frozenset({ALLOW_ANY_AE}))
    assert anyone.allows_any_calling_ae


def test_tls_ca_without_client_certificates_is_refused(tmp_path: Path) -> None:
    cert, key, ca = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    with pytest.raises(ValueError, match=r"tls\.ca_file .* tls\.require_client_cert"):
        ListenerConfig(spool_dir=tmp_path, tls=TLSConfig(cert, key, ca))
    with pytest.raises(ValueError, match=r"tls\.require_client_cert needs tls\.ca_file"):
        ListenerConfig(spool_dir=tmp_path, tls=TLSConfig(cert, key, require_client_cert=True))
    assert ListenerConfig(spool_dir=tmp_path, tls=TLSConfig(cert, key)).tls is not None
    assert ListenerConfig(spool_dir=tmp_path, tls=TLSConfig(cert, key, ca, True)).tls is not None


def test_invalid_limits_and_titles_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_inflated_bytes"):
        ListenerConfig(spool_dir=tmp_path, max_inflated_bytes=0)
    with pytest.raises(ValueError, match="allowed_aets"):
        ListenerConfig(spool_dir=tmp_path, allowed_aets=frozenset({"BAD\\AE"}))
