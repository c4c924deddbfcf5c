"""Stage 6, write files: durable, private Part 10 files, SR first; a re-run overwrites."""

from __future__ import annotations

import stat
from pathlib import Path

import pydicom

from tests.worker.studies import CXR, study_outputs
from worker.stages.outputs import StudyOutputs
from worker.stages.write import write_files


def _outputs(results_dir: Path) -> StudyOutputs:
    return study_outputs([CXR], results_dir, heatmap_max_side=128)


def test_files_written_sr_first_private_and_readable(tmp_path: Path, dicom_data: Path) -> None:
    outputs = _outputs(tmp_path / "results")
    paths = write_files(outputs)

    assert paths == tuple(o.path for o in outputs.objects) and len(paths) == 2
    for obj, path in zip(outputs.objects, paths, strict=True):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # PHI at rest
        assert pydicom.dcmread(path).SOPInstanceUID == obj.sop_instance_uid
    assert not [p for p in paths[0].parent.iterdir() if p.name.startswith(".")]  # no temp left

    again = write_files(_outputs(tmp_path / "results"))
    assert again == paths and sorted(paths[0].parent.iterdir()) == sorted(paths)


def test_nothing_to_write(tmp_path: Path) -> None:
    assert write_files(StudyOutputs(None, ())) == ()
    assert not (tmp_path / "results").exists()
