"""Shared fixtures for the model-training tests (paths relative to the repo)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
KERMANY = SHARED / "kermany"


@pytest.fixture(scope="session")
def kermany() -> Path:
    if not (KERMANY / "train").is_dir():
        pytest.skip("shared Kermany data not present (../shared/data/kermany)")
    return KERMANY


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip("shared data not present (../shared/data)")
    return SHARED
