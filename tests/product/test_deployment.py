"""docker-compose.yml and the Dockerfile stay in step with the CLI and the settings.

There is no Docker engine in CI, so the compose file is checked structurally:
every pneumo command it runs must parse with the real CLI, and every PNEUMO_*
variable it sets must be a real setting.
"""

from __future__ import annotations

import yaml

from pneumo.cli import build_parser
from pneumo.settings import Settings
from tests.paths import REPO


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_has_the_production_services() -> None:
    services = _compose()["services"]
    assert {"redis", "postgres", "listener", "worker", "migrate"} <= set(services)
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    # Listener and workers must see the same spool.
    assert services["listener"]["volumes"] == services["worker"]["volumes"]


def test_compose_commands_parse_with_the_real_cli() -> None:
    parser = build_parser()
    commands = [
        service["command"]
        for service in _compose()["services"].values()
        if service.get("command", [None])[0] == "pneumo"
    ]
    assert len(commands) >= 3
    for command in commands:
        args = parser.parse_args(command[1:])
        assert callable(args.func), command


def test_compose_environment_names_real_settings() -> None:
    env = _compose()["x-pneumo-env"]
    fields = {f"PNEUMO_{name.upper()}" for name in Settings.model_fields}
    unknown = set(env) - fields
    assert not unknown, f"compose sets variables no setting reads: {unknown}"
    assert env["PNEUMO_BROKER_URL"].startswith("redis://")
    assert env["PNEUMO_DATABASE_URL"].startswith("postgresql+psycopg://")


def test_dockerfile_copies_every_package() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    for package in ("pneumo", "dicom_io", "model", "db", "worker"):
        assert f"COPY {package} ./{package}" in dockerfile


def test_compose_listener_is_reachable_only_with_an_allow_list() -> None:
    listener = _compose()["services"]["listener"]["environment"]
    assert listener["PNEUMO_HOST"] == "0.0.0.0"
    assert listener["PNEUMO_ALLOWED_AETS"].startswith("${PNEUMO_ALLOWED_AETS:?")
