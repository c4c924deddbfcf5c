"""Shared fixtures for the dicom_io content tests (selection, pixels, SR, SC).

Paths come from :mod:`tests.paths`, skip helpers from the root ``conftest.py``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

ToolRunner = Callable[..., subprocess.CompletedProcess[str]]


def _run_tool(tool: str, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK / dicom3tools binary by absolute path (pynetdicom ships shadowing scripts)."""
    path = Path("/usr/bin") / tool
    if not path.is_file():
        pytest.skip(f"{tool} not installed")
    env = dict(os.environ, TCP_NODELAY="1")
    return subprocess.run(
        [str(path), *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.fixture(scope="session")
def run_tool() -> ToolRunner:
    return _run_tool


@pytest.fixture(scope="session")
def dciodvfy(run_tool: ToolRunner) -> Callable[[Path], tuple[list[str], list[str]]]:
    """Validate a file with dicom3tools' dciodvfy; return (errors, warnings) lines."""

    def check(path: Path) -> tuple[list[str], list[str]]:
        done = run_tool("dciodvfy", path)
        lines = (done.stdout + done.stderr).splitlines()
        errors = [line for line in lines if line.startswith("Error")]
        warnings = [line for line in lines if line.startswith("Warning")]
        assert not any(line.startswith("Abort") for line in lines), lines
        return errors, warnings

    return check
