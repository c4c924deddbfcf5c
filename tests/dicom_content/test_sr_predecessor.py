"""A reprocessed study's SR names the previous revision's SR (Predecessor Documents Sequence).

The study is reprocessed twice through real batches and the real pipeline (shipped
weights): each new SR has its own SOP Instance UID, references the SR of the revision
before it in (0040,A360) — read back from the file, or, once that file is gone, from the
UIDs the database recorded — and still passes dciodvfy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from db import repository as repo
from db.batches import BatchItemState, Selector, finish_item
from db.engine import session_scope
from db.models import StudyStatus
from dicom_io.sr import SRReference, result_sr_uid
from tests.worker.studies import CXR, record_study, worker_config
from worker import batches
from worker.config import WorkerConfig
from worker.pipeline import StudyOutcome, run_study

PREDECESSORS = pydicom.tag.Tag(0x0040, 0xA360)


def _predecessors(sr: Dataset) -> list[SRReference]:
    """Every (study, series, class, instance) the SR names in (0040,A360)."""
    refs = []
    for study in sr.get(PREDECESSORS, pydicom.Sequence()):
        for series in study.ReferencedSeriesSequence:
            for sop in series.ReferencedSOPSequence:
                refs.append(SRReference(str(study.StudyInstanceUID),
                                        str(series.SeriesInstanceUID),
                                        str(sop.ReferencedSOPClassUID),
                                        str(sop.ReferencedSOPInstanceUID)))  # fmt: skip
    return refs


def _reprocess(config: WorkerConfig, study_uid: str) -> StudyOutcome:
    """One batch over the study, its item run by the pipeline and recorded as the task would."""
    published: list[tuple[int, int]] = []
    batches.start_batch(config.database_url, Selector(study_uids=(study_uid,)), started_by="test")
    assert batches.pump_once(config, lambda s, r: published.append((s, r))) == 1
    ((study_id, revision),) = published
    return _run(config, study_id, revision)


def _run(config: WorkerConfig, study_id: int, revision: int) -> StudyOutcome:
    outcome = run_study(config, study_id, revision)
    with session_scope(config.database_url) as session:
        repo.set_study_status(session, study_id, StudyStatus.DONE, revision=revision)
        finish_item(session, study_id, revision, BatchItemState.DONE)
    return outcome


def test_each_reprocessed_sr_names_the_previous_one_from_file_or_database(
    tmp_path: Path, dciodvfy: Callable[[Path], tuple[list[str], list[str]]]
) -> None:
    from model.inference import default_weights_path

    if not default_weights_path().exists():
        pytest.skip("no model weights")
    config = worker_config(tmp_path)
    study = record_study(config, [CXR])
    first = _run(config, study.study_id, study.revision)
    second = _reprocess(config, study.study_uid)
    first_sr, second_sr = (pydicom.dcmread(o.files[0]) for o in (first, second))

    assert second.revision == first.revision + 1
    assert second_sr.SOPInstanceUID != first_sr.SOPInstanceUID
    assert PREDECESSORS not in first_sr  # nothing came before the first report
    assert _predecessors(second_sr) == [SRReference.from_dataset(first_sr)]
    assert dciodvfy(second.files[0])[0] == []

    second.files[0].unlink()  # the previous SR's file is gone: the recorded UIDs stand in
    third = _reprocess(config, study.study_uid)
    third_sr = pydicom.dcmread(third.files[0])
    assert third.revision == second.revision + 1
    assert third_sr.SOPInstanceUID not in (first_sr.SOPInstanceUID, second_sr.SOPInstanceUID)
    assert _predecessors(third_sr) == [SRReference.from_dataset(second_sr)]
    assert dciodvfy(third.files[0])[0] == []

    rerun = _run(config, study.study_id, third.revision)  # a redelivered task: same SR again
    assert _predecessors(pydicom.dcmread(rerun.files[0])) == _predecessors(third_sr)


def test_a_predecessor_must_be_another_sr_of_the_same_study() -> None:
    from pydicom.uid import generate_uid

    from dicom_io.sr import AlgorithmInfo, ImageFinding, build_result_sr, result_sr_reference

    source = pydicom.dcmread(CXR, stop_before_pixels=True)
    study_uid = str(source.StudyInstanceUID)
    algorithm = AlgorithmInfo("pneumonet", "1.0.0", "pneumo", "pneumonet")

    def build(predecessor: SRReference) -> Dataset:
        return build_result_sr(evidence=[source], findings=[ImageFinding(source, 0.7, 0.5)],
                               algorithm=algorithm, revision=2, summary="s",
                               predecessors=[predecessor])  # fmt: skip

    itself = result_sr_reference(study_uid, "1.0.0", result_sr_uid(study_uid, "1.0.0", 2))
    with pytest.raises(ValueError, match="being built"):
        build(itself)
    with pytest.raises(ValueError, match="same study"):
        build(result_sr_reference(generate_uid(), "1.0.0", generate_uid()))
    with pytest.raises(ValueError, match="sop_instance_uid"):
        result_sr_reference(study_uid, "1.0.0", "not-a-uid")
    previous = result_sr_reference(study_uid, "0.9.0", result_sr_uid(study_uid, "0.9.0", 1))
    assert _predecessors(build(previous)) == [previous]
