"""docker-compose.yml is a valid Compose file that runs real pneumo commands with real settings.

There is no Docker engine in CI, so the file is checked by parsing:

* against the Compose Specification's published JSON schema
  (``schema/compose-spec.json`` of the compose-spec project), as vendored in the
  ``check-jsonschema`` package from PyPI (a test dependency), both as written and
  after compose's variable interpolation with the example env file;
* every ``pneumo`` command it runs (command, entrypoint, health check) parses
  with the real CLI parser, and every ``PNEUMO_*`` name is a real setting;
* secrets have no defaults: compose must refuse to start until they are set.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from importlib.resources import files
from typing import Any

import jsonschema
import pytest
import yaml

from pneumo.cli import build_parser
from pneumo.settings import Settings
from tests.paths import REPO

COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
PNEUMO_SERVICES = ("migrate", "listener", "worker", "api")
LONG_RUNNING = ("redis", "postgres", "listener", "worker", "api")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|(^|_)KEY$")
SETTING_NAMES = frozenset(f"PNEUMO_{name.upper()}" for name in Settings.model_fields)

# Compose interpolation (Compose Specification, "Interpolation"): $$ is a literal $;
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error},
# ${NAME:+alt}, ${NAME+alt} and $NAME.
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(Exception):
    """A ``${NAME:?message}`` whose variable is unset or empty: compose refuses to start."""


@cache
def compose_text() -> str:
    return COMPOSE.read_text()


def compose() -> dict[str, Any]:
    """A fresh copy each call (tests may change it); YAML merge keys resolved."""
    document: dict[str, Any] = yaml.safe_load(compose_text())
    return document


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


@cache
def compose_schema() -> dict[str, Any]:
    """The Compose Specification's JSON schema, from the installed check-jsonschema wheel."""
    vendor = files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads((vendor / "compose-spec.json").read_text(encoding="utf-8"))
    return schema


def schema_errors(document: Any) -> list[str]:
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def read_env_file(text: str) -> dict[str, str]:
    """KEY=value lines (compose's .env format, as the example uses it); comments skipped."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=value: {line!r}"
        values[key.strip()] = value.strip()
    return values


def example_env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE.read_text())


def interpolate(text: str, env: dict[str, str]) -> str:
    """``text`` with compose's variable interpolation applied.

    Raises:
        MissingVariable: for a required variable (``:?`` / ``?``) that is unset (or empty).
    """

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        op, arg = match["op"], match["arg"] or ""
        value = env.get(name)
        is_set, is_nonempty = value is not None, bool(value)
        present = is_nonempty if op and op.startswith(":") else is_set
        if op in (":-", "-"):
            return value if present else arg  # type: ignore[return-value]
        if op in (":?", "?"):
            if not present:
                raise MissingVariable(f"{name}: {arg}")
            return value  # type: ignore[return-value]
        if op in (":+", "+"):
            return arg if present else ""
        return value or ""

    return _VARIABLE.sub(substitute, text)


def variable_uses() -> Iterator[tuple[str, str | None]]:
    """(name, operator) of each variable the compose file interpolates."""
    for match in _VARIABLE.finditer(compose_text()):
        if not match["escaped"]:
            yield match["braced"] or match["bare"], match["op"]


def as_argv(value: Any) -> list[str]:
    """A command in list form (compose also allows one string, split like a shell)."""
    if isinstance(value, str):
        return value.split()
    return [str(part) for part in value]


def pneumo_commands() -> Iterator[tuple[str, list[str]]]:
    """(where, argv) of every pneumo command a service runs: command, entrypoint, health check."""
    for name, service in services().items():
        for key in ("entrypoint", "command"):
            if key in service and as_argv(service[key])[:1] == ["pneumo"]:
                yield f"{name}.{key}", as_argv(service[key])
        test = as_argv(service.get("healthcheck", {}).get("test", []))
        if test[:1] == ["CMD"] and test[1:2] == ["pneumo"]:
            yield f"{name}.healthcheck", test[1:]


def environment_names(environment: Any) -> set[str]:
    if isinstance(environment, dict):
        return set(environment)
    return {item.partition("=")[0] for item in environment or []}


# --- the schema ------------------------------------------------------------------------


def test_the_schema_is_the_compose_specification() -> None:
    schema = compose_schema()
    assert schema["title"] == "Compose Specification"
    assert "service_completed_successfully" in json.dumps(schema)


def test_compose_file_is_valid_under_the_compose_specification() -> None:
    assert schema_errors(compose()) == []


def test_compose_file_is_valid_after_interpolation_with_the_example_env() -> None:
    env = example_env() | {
        name: "Example1" for name, value in example_env().items() if not value
    }  # what an operator fills in
    interpolated = yaml.safe_load(interpolate(compose_text(), env))
    assert schema_errors(interpolated) == []
    for service in PNEUMO_SERVICES:
        environment = interpolated["services"][service]["environment"]
        Settings(**{k.removeprefix("PNEUMO_").lower(): v for k, v in environment.items()})


def test_the_schema_check_catches_an_invalid_file() -> None:
    broken = compose()
    broken["services"]["worker"]["depends_on"]["migrate"]["condition"] = "service_finished"
    broken["services"]["redis"]["healthcheck"]["every"] = "5s"
    assert len(schema_errors(broken)) >= 2


# --- the services ------------------------------------------------------------------------


def test_compose_has_the_production_services() -> None:
    assert set(LONG_RUNNING) | {"migrate"} <= set(services())


def test_redis_persists_its_queue_on_a_volume() -> None:
    redis = services()["redis"]
    assert "--appendonly yes" in " ".join(as_argv(redis["command"]))
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert any(
        volume.endswith(":/var/lib/postgresql/data") for volume in services()["postgres"]["volumes"]
    )


def test_migrations_run_once_before_every_pneumo_service() -> None:
    migrate = services()["migrate"]
    assert as_argv(migrate["command"]) == ["pneumo", "db", "upgrade"]
    assert migrate["restart"] == "no"
    for name in ("listener", "worker", "api"):
        depends = services()[name]["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}, name
        assert depends["redis"] == {"condition": "service_healthy"}, name


def test_listener_is_published_and_needs_an_allow_list() -> None:
    listener = services()["listener"]
    assert as_argv(listener["command"]) == ["pneumo", "listen"]
    assert any(str(port).endswith(":11112") for port in listener["ports"])
    env = listener["environment"]
    assert env["PNEUMO_HOST"] == "0.0.0.0"
    assert env["PNEUMO_PORT"] == "11112"
    assert env["PNEUMO_ALLOWED_AETS"].startswith("${PNEUMO_ALLOWED_AETS:?")


def test_worker_reserves_one_gpu_for_one_process() -> None:
    worker = services()["worker"]
    argv = as_argv(worker["command"])
    assert argv[:2] == ["pneumo", "worker"]
    assert argv[argv.index("--concurrency") + 1] == "1"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["capabilities"] == ["gpu"]
    # A device id, not `count: 1`: Docker would give every replica the same first GPU.
    assert len(devices[0]["device_ids"]) == 1 and "count" not in devices[0]


def test_api_listens_on_all_interfaces_on_port_8000() -> None:
    api = services()["api"]
    argv = as_argv(api["command"])
    assert argv[:2] == ["pneumo", "api"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert any(str(port).endswith(":8000") for port in api["ports"])


def test_every_long_running_service_has_a_health_check() -> None:
    for name in LONG_RUNNING:
        test = as_argv(services()[name]["healthcheck"]["test"])
        assert test[0] in ("CMD", "CMD-SHELL"), name
    for name, target in (("listener", "listener"), ("worker", "worker"), ("api", "api")):
        test = as_argv(services()[name]["healthcheck"]["test"])
        assert test[1:4] == ["pneumo", "ping", target], name
    assert "/api/health" in " ".join(as_argv(services()["api"]["healthcheck"]["test"]))


def test_listener_workers_and_api_share_the_data_volume() -> None:
    mounts = {name: services()[name]["volumes"] for name in ("listener", "worker", "api")}
    shared = {v for v in mounts["listener"] if v.split(":")[1] == "/data"}
    assert shared and shared.pop().split(":")[0] in compose()["volumes"]
    assert mounts["listener"] == mounts["worker"] == mounts["api"]


# --- commands and settings -------------------------------------------------------------------


def test_every_pneumo_command_parses_with_the_real_cli() -> None:
    parser = build_parser()
    commands = list(pneumo_commands())
    assert len(commands) >= 7  # 4 commands + 3 health checks
    for where, argv in commands:
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{where}: `{' '.join(argv)}` is not a pneumo command")
        assert callable(args.func), where


def test_every_pneumo_variable_is_a_setting() -> None:
    used: set[str] = set()
    for service in services().values():
        used |= environment_names(service.get("environment"))
    for key, value in compose().items():
        if key.startswith("x-") and isinstance(value, dict):
            used |= environment_names(value)
    used |= {name for name, _ in variable_uses()}
    unknown = {name for name in used if name.startswith("PNEUMO_")} - SETTING_NAMES
    assert not unknown, f"compose names PNEUMO_ variables no setting reads: {sorted(unknown)}"


def test_example_env_names_settings_or_compose_variables() -> None:
    compose_variables = {name for name, _ in variable_uses()}
    for key in example_env():
        if key.startswith("PNEUMO_"):
            assert key in SETTING_NAMES, f".env.example: {key} is not a setting"
        else:
            assert key in compose_variables, f".env.example: compose does not use {key}"
    required = {name for name, op in variable_uses() if op in (":?", "?")}
    assert required <= set(example_env()), "a required variable is missing from .env.example"


# --- secrets ---------------------------------------------------------------------------------------


def test_secrets_are_required_and_have_no_default() -> None:
    secrets = [(name, op) for name, op in variable_uses() if SECRET_NAME.search(name)]
    assert {name for name, _ in secrets} >= {"POSTGRES_PASSWORD", "REDIS_PASSWORD"}
    for name, op in secrets:
        assert op == ":?", f"${{{name}}} must be written ${{{name}:?message}}, not with {op}"
    assert not re.search(r":-[^}]*\}@", compose_text()), "a default inside a URL's credentials"


def test_no_secret_value_is_written_in_the_files() -> None:
    for name, service in services().items():
        environment = service.get("environment") or {}
        for key, value in environment.items() if isinstance(environment, dict) else ():
            if SECRET_NAME.search(key):
                assert str(value).startswith("${"), f"{name}: {key} is written in the file"
    for key, value in example_env().items():
        if SECRET_NAME.search(key):
            assert value == "", f".env.example: {key} must be empty"


@pytest.mark.parametrize("missing", ["POSTGRES_PASSWORD", "REDIS_PASSWORD", "PNEUMO_ALLOWED_AETS"])
def test_compose_refuses_to_start_without_a_required_value(missing: str) -> None:
    env = {name: value or "Example1" for name, value in example_env().items()}
    env[missing] = ""
    with pytest.raises(MissingVariable, match=missing):
        interpolate(compose_text(), env)


def test_interpolation_follows_the_specification() -> None:
    env = {"SET": "v", "EMPTY": ""}
    assert (
        interpolate("$$SET ${SET} $SET ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d}", env) == "$SET v v d d "
    )
    assert interpolate("${SET:+alt}${UNSET:+alt}", env) == "alt"
    with pytest.raises(MissingVariable, match="EMPTY: needed"):
        interpolate("${EMPTY:?needed}", env)
    assert interpolate("${EMPTY?needed}", env) == ""
