"""Stages 1 and 2 together: headers are read without pixels, and only the selected
images are decoded from their files (issue 8 item 3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.worker.studies import CT, CXR, record_study, worker_config
from worker.stages import read as read_stage
from worker.stages.load import load_study
from worker.stages.read import select_and_read


def test_load_reads_headers_only_and_read_decodes_only_selected(
    tmp_path: Path, dicom_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = worker_config(tmp_path)
    study = record_study(config, [CXR, CT])
    loaded = load_study(config.database_url, study.study_id, study.revision)
    for item, path in zip(loaded.instances, study.paths, strict=True):
        assert item.dataset is not None and "PixelData" not in item.dataset
        assert item.path == str(path) and "Rows" in item.dataset

    decoded: list[str] = []
    real = read_stage.read_pixels_file

    def counting(path: str, **kwargs: int):  # type: ignore[no-untyped-def]
        decoded.append(path)
        return real(path, **kwargs)

    monkeypatch.setattr(read_stage, "read_pixels_file", counting)
    read = select_and_read(loaded, max_pixels_bits=1 << 30)

    chest, ct = read.instances
    assert chest.image is not None and chest.skip_reason is None
    assert ct.image is None and ct.skip_reason == "modality:CT"
    assert decoded == [str(study.paths[0])]  # the CT's pixels were never read


def test_a_file_gone_between_load_and_read_is_unreadable_not_an_error(
    tmp_path: Path, dicom_data: Path
) -> None:
    config = worker_config(tmp_path)
    study = record_study(config, [CXR])
    loaded = load_study(config.database_url, study.study_id, study.revision)
    study.paths[0].unlink()  # e.g. purged by retention meanwhile
    (item,) = select_and_read(loaded, max_pixels_bits=1 << 30).instances
    assert item.image is None and item.skip_reason == "undecodable:unreadable"
