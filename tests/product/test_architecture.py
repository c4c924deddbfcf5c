"""The layering and the one vocabulary hold: checked on the source, not by review.

``worker`` imports nothing of ``pneumo``; the import-linter contracts in
pyproject.toml are kept; queue names are spelled only in ``worker.queues``;
every command returns an :class:`~pneumo.exit_codes.ExitCode`.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pneumo.cli import main
from pneumo.exit_codes import ExitCode
from tests.paths import REPO

QUEUE_LITERAL = re.compile(r"""["'](realtime|batch)["']""")


def _sources(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_worker_imports_nothing_from_pneumo() -> None:
    offenders = {
        str(path.relative_to(REPO)): sorted(
            name for name in _imported_modules(path) if name.split(".")[0] == "pneumo"
        )
        for path in _sources("worker")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_import_contracts_are_kept() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    if not lint_imports.exists() and shutil.which("lint-imports") is None:
        pytest.skip("import-linter not installed (test extras)")
    command = str(lint_imports) if lint_imports.exists() else "lint-imports"
    run = subprocess.run(
        [command, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-3000:]


def test_queue_names_are_spelled_only_in_worker_queues() -> None:
    spelled = [
        f"{path.relative_to(REPO)}:{number}"
        for package in ("worker", "pneumo")
        for path in _sources(package)
        if path != REPO / "worker" / "queues.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if QUEUE_LITERAL.search(line)
    ]
    assert spelled == []


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["send", "/nonexistent/path", "--to", "PACS@127.0.0.1:104"], ExitCode.USAGE),
        (["send", "/nonexistent/path", "--to", "not-a-destination"], ExitCode.USAGE),
        (["send", "/nonexistent/path"], ExitCode.USAGE),
        (["worker", "--queues", "realtime,urgent"], ExitCode.USAGE),
    ],
)
def test_commands_return_the_shared_exit_codes(
    argv: list[str], code: ExitCode, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PNEUMO_DESTINATIONS", raising=False)
    assert main(argv) == code


@pytest.mark.parametrize(
    ("argv", "module"),
    [
        (["up"], "service"),
        (["listen"], "service"),
        (["worker", "--queues", "batch"], "service"),
        (["reprocess", "--study-uid", "1.2.3"], "operator"),
        (["diff", "--from-version", "1.0.0", "--to-version", "1.1.0"], "operator"),
        (["db", "upgrade"], "admin"),
        (["status", "--format", "json"], "admin"),
        (["results", "--paths"], "staff"),
        (["send", "x", "--to", "PACS@h:104"], "admin"),
    ],
)
def test_command_modules_named_for_what_they_serve(argv: list[str], module: str) -> None:
    from pneumo.cli import build_parser

    args = build_parser().parse_args(argv)
    assert args.func.__module__ == f"pneumo.commands.{module}"
