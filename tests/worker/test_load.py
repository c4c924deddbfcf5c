"""Stage 1, load: rows from the database, files parsed and sanitised, broken files skipped."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io.selection import SkipReason
from tests.worker.studies import CXR, record_study, worker_config
from worker.stages.load import LoadedInstance, LoadedStudy, load_study


def test_instances_in_order_with_a_missing_file_unreadable(
    tmp_path: Path, dicom_data: Path
) -> None:
    config = worker_config(tmp_path)
    study = record_study(config, [CXR, CXR], age="006Y")
    study.paths[1].unlink()  # gone from the spool after it was recorded

    loaded = load_study(config.database_url, study.study_id, study.revision)

    assert isinstance(loaded, LoadedStudy)
    assert (loaded.study_id, loaded.study_uid, loaded.revision) == (
        study.study_id,
        study.study_uid,
        study.revision,
    )
    first, second = loaded.instances
    assert first.dataset is not None and first.skip_reason is None
    assert str(first.dataset.SOPInstanceUID) == first.sop_instance_uid
    assert second.dataset is None and second.skip_reason is SkipReason.UNREADABLE
    assert loaded.first_dataset is first.dataset


def test_invalid_header_dates_are_blanked_and_reported(tmp_path: Path, dicom_data: Path) -> None:
    config = worker_config(tmp_path)
    study = record_study(config, [CXR])
    ds = pydicom.dcmread(study.paths[0])
    ds.PatientBirthDate = "19800231"  # no 31 February
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # the VR travels with the value
    ds.save_as(study.paths[0], enforce_file_format=True)

    (instance,) = load_study(config.database_url, study.study_id, study.revision).instances

    assert instance.dataset is not None and not instance.dataset.PatientBirthDate
    assert instance.header_fixes == ("invalid-da:PatientBirthDate",)


def test_unknown_study(tmp_path: Path) -> None:
    config = worker_config(tmp_path)
    with pytest.raises(LookupError, match="study id 99"):
        load_study(config.database_url, 99, 1)


def test_loaded_values_are_frozen() -> None:
    item = LoadedInstance(1, "1.2.3", None, SkipReason.UNREADABLE)
    with pytest.raises(AttributeError):
        item.instance_id = 2  # type: ignore[misc]
