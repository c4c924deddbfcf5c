"""ListenerConfig refuses insecure or meaningless settings, naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_io.config import ALLOW_ANY_AE, AllowedPeer, ListenerConfig, TLSConfig


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


def test_allowed_peer_entries_parse_and_normalise(tmp_path: Path) -> None:
    import ipaddress

    assert AllowedPeer.parse(" PACS ") == AllowedPeer("PACS")
    assert AllowedPeer.parse("PACS@10.1.2.3").network == ipaddress.ip_network("10.1.2.3/32")
    assert str(AllowedPeer.parse("PACS @ 10.1.2.3/32")) == "PACS@10.1.2.3"
    assert str(AllowedPeer.parse("PACS@10.1.0.0/16")) == "PACS@10.1.0.0/16"
    assert str(AllowedPeer.parse("PACS@FD00::/64")) == "PACS@fd00::/64"
    assert str(AllowedPeer.parse("A@B@127.0.0.1")) == "A@B@127.0.0.1"  # the last @ splits
    config = ListenerConfig(
        spool_dir=tmp_path,
        host="0.0.0.0",
        allowed_aets=frozenset({"PACS@10.1.2.3", " PACS@10.2.0.0/16", "MOD", "PACS@fd00::/64"}),
    )
    assert config.allowed_aets == {"PACS@10.1.2.3", "PACS@10.2.0.0/16", "MOD", "PACS@fd00::/64"}
    assert config.allowed_calling_aets == {"PACS", "MOD"}
    assert config.restricts_peer_addresses and not config.allows_any_calling_ae
    assert config.allows_peer("PACS", "10.1.2.3") and config.allows_peer("PACS", "10.2.255.1")
    # IPv4-mapped, as a dual-stack ("::") bind sees an IPv4 caller.
    assert config.allows_peer("PACS", "::ffff:10.1.2.3")
    assert config.allows_peer("PACS", "fd00::1") and not config.allows_peer("PACS", "fd01::1")
    assert not config.allows_peer("PACS", "10.1.2.4") and not config.allows_peer("PACS", "host")
    assert config.allows_peer("MOD", "192.0.2.7") and not config.allows_peer("OTHER", "10.1.2.3")
    bare = ListenerConfig(spool_dir=tmp_path, allowed_aets=frozenset({"PACS"}))
    assert not bare.restricts_peer_addresses and bare.allows_peer("PACS", "192.0.2.7")


@pytest.mark.parametrize(
    "entry",
    [
        "PACS@10.1.2.3/8",  # host bits set
        "PACS@pacs.local",  # host names are not resolved (DNS is not an identity)
        "PACS@",
        "PACS@10.1.2.300",
        "@10.1.2.3",
        "TOO_LONG_AE_TITLE_X@10.1.2.3",
        "*@10.0.0.0/8",
    ],
)
def test_invalid_allowed_peer_names_the_field(tmp_path: Path, entry: str) -> None:
    with pytest.raises(ValueError, match="allowed_aets"):
        ListenerConfig(spool_dir=tmp_path, allowed_aets=frozenset({entry}))


def test_any_ae_beside_address_entries_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"allowed_aets: '\*' accepts any caller"):
        ListenerConfig(spool_dir=tmp_path, allowed_aets=frozenset({"*", "PACS@10.1.2.3"}))
    assert ListenerConfig(spool_dir=tmp_path, allowed_aets=frozenset({"*", "PACS"}))


def test_settings_accept_peer_addresses_and_ping_calls_as_a_bare_title(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from pneumo.commands.health import DEFAULT_PING_CALLING_AE, _calling_ae
    from pneumo.settings import Settings

    settings = Settings(
        data_dir=tmp_path,
        host="0.0.0.0",
        allowed_aets=" PACS@10.1.0.0/16, LOCAL@127.0.0.1/32 ,MOD",
    )
    assert settings.allowed_aets == ["PACS@10.1.0.0/16", "LOCAL@127.0.0.1", "MOD"]
    listener = settings.listener_config()
    assert listener.allowed_calling_aets == {"PACS", "LOCAL", "MOD"}
    # The health check's C-ECHO comes from loopback: the first title allowed from there.
    assert _calling_ae(settings, None) == "LOCAL"
    assert _calling_ae(settings, "GIVEN") == "GIVEN"
    only_remote = Settings(data_dir=tmp_path, allowed_aets="PACS@10.1.2.3")
    assert _calling_ae(only_remote, None) == "PACS"  # a bare title, never "PACS@10.1.2.3"
    assert _calling_ae(Settings(data_dir=tmp_path, allowed_aets="*"), None) == (
        DEFAULT_PING_CALLING_AE
    )
    with pytest.raises(ValidationError, match="allowed_aets"):
        Settings(data_dir=tmp_path, allowed_aets="PACS@10.1.2.3/8")
