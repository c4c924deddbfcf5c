"""Stage 6, write files: every built object as a Part 10 file, durably, before any row names it.

Files first, rows second (:mod:`worker.stages.save`): a row never names a file
that is not on disk yet. A crash in between leaves files with deterministic
UIDs that the retry simply overwrites.
"""

from __future__ import annotations

from pathlib import Path

from dicom_io.durable import write_part10
from worker.stages.outputs import StudyOutputs

__all__ = ["write_files"]


def write_files(outputs: StudyOutputs) -> tuple[Path, ...]:
    """Write the SR then the SCs (temp file, fsync, rename, folder fsync; mode 0600).

    Returns the paths written, SR first.

    Raises:
        ValueError: pydicom cannot encode an object as a Part 10 file.
        OSError: a write, flush or rename failed; that file is then unchanged.
    """
    return tuple(write_part10(obj.dataset, obj.path) for obj in outputs.objects)
