"""Paths every test module shares: the repository and the shared data beside it.

Import these (``from tests.paths import REPO, SHARED``) instead of recomputing
them per file; the root ``conftest.py`` turns a missing folder into a skip.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DICOM_DATA", "KERMANY", "PNEUMONIAMNIST", "REPO", "SAMPLES", "SHARED"]

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DICOM_DATA = SHARED / "dicom"
KERMANY = SHARED / "kermany"
PNEUMONIAMNIST = SHARED / "pneumoniamnist"
SAMPLES = REPO / "samples"
