"""The one settings object: environment, TOML file, validation, derived configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from dicom_io.config import Destination
from pneumo.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("PNEUMO_"):
            monkeypatch.delenv(key)


def test_defaults_are_embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PNEUMO_DATA_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.ae_title == "PNEUMO" and settings.port == 11112
    assert settings.embedded
    assert settings.effective_database_url == f"sqlite:///{tmp_path.resolve() / 'pneumo.db'}"
    assert settings.effective_broker_url == f"redis+socket://{tmp_path.resolve() / 'redis.sock'}"
    assert settings.uses_embedded_broker
    assert settings.spool_dir == tmp_path / "spool"


def test_environment_lists_and_destinations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PNEUMO_ALLOWED_AETS", " PACS1 , MODALITY2,")
    monkeypatch.setenv("PNEUMO_DESTINATIONS", "PACS@10.1.2.3:104,ARCHIVE@archive.local:11112")
    monkeypatch.setenv("PNEUMO_STUDY_QUIET_SECONDS", "2.5")
    settings = load_settings()
    assert settings.allowed_aets == ["PACS1", "MODALITY2"]
    assert settings.destinations == [
        Destination("PACS", "10.1.2.3", 104),
        Destination("ARCHIVE", "archive.local", 11112),
    ]
    listener = settings.listener_config()
    assert listener.allowed_aets == frozenset({"PACS1", "MODALITY2"})
    assert listener.study_quiet_seconds == 2.5


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("PNEUMO_AE_TITLE", "THIS_TITLE_IS_TOO_LONG"),
        ("PNEUMO_AE_TITLE", "BACK\\SLASH"),
        ("PNEUMO_DESTINATIONS", "PACS@host"),
        ("PNEUMO_DESTINATIONS", "PACS@host:70000"),
        ("PNEUMO_PORT", "-1"),
        ("PNEUMO_STUDY_QUIET_SECONDS", "0"),
    ],
)
def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch, key: str, value: str) -> None:
    monkeypatch.setenv(key, value)
    with pytest.raises((ValidationError, ValueError)):
        load_settings()


def test_toml_file_below_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "pneumo.toml"
    config.write_text('ae_title = "FROMTOML"\nport = 4242\ndestinations = ["PACS@pacs:104"]\n')
    monkeypatch.setenv("PNEUMO_CONFIG", str(config))
    monkeypatch.setenv("PNEUMO_PORT", "5151")
    settings = load_settings()
    assert settings.ae_title == "FROMTOML"
    assert settings.port == 5151  # the environment wins over the file
    assert settings.destinations == [Destination("PACS", "pacs", 104)]


def test_tls_config_only_when_cert_and_key(tmp_path: Path) -> None:
    assert Settings(tls_cert=tmp_path / "c.pem").tls_config() is None
    tls = Settings(
        tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem", tls_require_client_cert=True
    ).tls_config()
    assert tls is not None and tls.require_client_cert and tls.key_file == tmp_path / "k.pem"


def test_default_listener_binds_loopback_and_starts_without_allow_list(tmp_path: Path) -> None:
    listener = Settings(data_dir=tmp_path).listener_config()
    assert listener.host == "127.0.0.1" and listener.allowed_aets == frozenset()
    with pytest.raises(ValueError, match="allowed_aets"):
        Settings(data_dir=tmp_path, host="0.0.0.0").listener_config()
