"""The Dockerfile builds in one stage and runs, unprivileged, a real pneumo command in another.

No Docker engine in CI: the file is read as instructions (continuations joined,
comments dropped) and checked for the shape the deployment relies on.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field

import pytest

from pneumo.cli import build_parser
from tests.paths import REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|make|cmake|cargo|rustc)\b")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def stages() -> list[Stage]:
    found: list[Stage] = []
    for keyword, args in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            found.append(Stage(base=words[0], name=name))
        elif found:
            found[-1].instructions.append((keyword, args))
    return found


def exec_form(args: str) -> list[str]:
    """A CMD/ENTRYPOINT/HEALTHCHECK CMD argument in exec (JSON) form; shell form fails."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def test_dockerfile_is_multi_stage() -> None:
    found = stages()
    assert len(found) >= 2
    builder, final = found[0], found[-1]
    assert builder.name, "the build stage is named, for COPY --from"
    assert any(f"--from={builder.name}" in copy for copy in final.all("COPY"))
    assert any("pip install" in run for run in builder.all("RUN"))


def test_final_stage_runs_as_a_user_that_is_not_root() -> None:
    users = stages()[-1].all("USER")
    assert users, "the final stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def test_final_stage_has_no_compilers_nor_installs() -> None:
    for run in stages()[-1].all("RUN"):
        assert not COMPILERS.search(run), run
        assert "pip install" not in run, run


def test_every_command_it_runs_is_a_pneumo_command() -> None:
    parser = build_parser()
    final = stages()[-1]
    commands = [exec_form(args) for args in final.all("CMD") + final.all("ENTRYPOINT")]
    for check in final.all("HEALTHCHECK"):
        _, _, cmd = check.partition("CMD ")
        if cmd:
            commands.append(exec_form(cmd))
    assert commands
    for argv in commands:
        assert argv[0] == "pneumo", argv
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"`{' '.join(argv)}` is not a pneumo command")
        assert callable(args.func)


def test_build_context_keeps_secrets_and_local_state_out() -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    assert {".env", ".git", ".venv", "var/"} <= ignored
    copied = [args.split()[0] for args in stages()[0].all("COPY")]
    for source in copied:
        assert source not in ignored and f"{source}/" not in ignored, source


def test_builder_copies_every_package_it_installs() -> None:
    copied = {args.split()[0] for args in stages()[0].all("COPY")}
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    found = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in found}
    assert packages
    assert packages | {"pyproject.toml"} <= copied
