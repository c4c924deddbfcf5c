"""Repository writes on SQLite and PostgreSQL: upserts never duplicate, revisions advance."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from db import migrate
from db import repository as repo
from db.engine import session_scope
from db.models import (
    Delivery,
    DeliveryStatus,
    ImageResult,
    Instance,
    Result,
    ResultStatus,
    Study,
    StudyStatus,
)

STUDY = "1.2.826.0.1.3680043.8.498.1"


def _instance(n: int, study: str = STUDY) -> repo.InstanceRecord:
    return repo.InstanceRecord(
        study_uid=study,
        series_uid=f"{study}.1",
        sop_instance_uid=f"{study}.1.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"/spool/{n}.dcm",
        size=1000 + n,
        calling_aet="MODALITY",
        received_at=datetime.now(UTC),
    )


@pytest.fixture
def url(db_url: str) -> str:
    migrate.upgrade(db_url)
    return db_url


def _count(url: str, model: type) -> int:
    with session_scope(url) as s:
        return s.execute(select(func.count()).select_from(model)).scalar_one()


def test_record_instance_twice_is_one_row(url: str) -> None:
    with session_scope(url) as s:
        first = repo.record_instance(s, _instance(1))
        repo.record_instance(s, _instance(2))
    with session_scope(url) as s:
        again = repo.record_instance(s, _instance(1))  # a re-sent instance
    assert again == first
    assert _count(url, Instance) == 2
    assert _count(url, Study) == 1


def test_revisions_advance_only_when_amended(url: str) -> None:
    header = repo.StudyHeader("PID1", "ACC1", date(2024, 5, 1), "006Y")
    with session_scope(url) as s:
        repo.record_instance(s, _instance(1))
        sid, rev1 = repo.mark_study_queued(s, STUDY, amended=False, header=header)
    with session_scope(url) as s:
        _, rev_same = repo.mark_study_queued(s, STUDY, amended=False)  # redispatch
        _, rev2 = repo.mark_study_queued(s, STUDY, amended=True)
    assert (rev1, rev_same, rev2) == (1, 1, 2)
    with session_scope(url) as s:
        study = s.get(Study, sid)
        assert study.status is StudyStatus.QUEUED
        assert (study.patient_id, study.accession_number) == ("PID1", "ACC1")
        assert study.study_date == date(2024, 5, 1)


def test_save_result_is_idempotent_per_study_model_revision(url: str) -> None:
    with session_scope(url) as s:
        instance_id = repo.record_instance(s, _instance(1))
        sid, rev = repo.mark_study_queued(s, STUDY, amended=False)
        mv = repo.ensure_model_version(s, name="m", version="1", sha256="a" * 64, threshold=0.5)
        assert (
            repo.ensure_model_version(s, name="m", version="1", sha256="a" * 64, threshold=0.5)
            == mv
        )

    def save(probability: float) -> int:
        record = repo.ResultRecord(
            study_id=sid,
            model_version_id=mv,
            revision=rev,
            status=ResultStatus.COMPLETE,
            probability=probability,
            finding=probability >= 0.5,
            threshold=0.5,
            ood=False,
            outside_intended_use=False,
            flags=("x",),
            timings={"inference": 0.1},
        )
        image = repo.ImageOutcome(instance_id, probability, 0.1, True, probability >= 0.5)
        with session_scope(url) as s:
            return repo.save_result(s, record, [image])

    first = save(0.2)
    second = save(0.8)  # the redelivered task computes again
    assert first == second
    assert _count(url, Result) == 1
    assert _count(url, ImageResult) == 1
    with session_scope(url) as s:
        result = s.get(Result, first)
        assert result.probability == pytest.approx(0.8)
        assert result.flags == ["x"]
        repo.update_timings(s, first, {"send": 0.5})
    with session_scope(url) as s:
        assert s.get(Result, first).timings == {"inference": 0.1, "send": 0.5}
        rows = repo.recent_results(s, study_uid=STUDY)
    assert len(rows) == 1 and rows[0].finding is True and rows[0].model == "m-1"


def test_unique_key_rejects_plain_duplicate_insert(url: str) -> None:
    with session_scope(url) as s:
        sid, rev = repo.mark_study_queued(s, STUDY, amended=False)
        mv = repo.ensure_model_version(s, name="m", version="1", sha256="b" * 64, threshold=0.5)
    fields = dict(
        study_id=sid,
        model_version_id=mv,
        revision=rev,
        status=ResultStatus.NO_USABLE_IMAGE,
        threshold=0.5,
    )
    with session_scope(url) as s:
        s.add(Result(**fields))
    with pytest.raises(IntegrityError):
        with session_scope(url) as s:
            s.add(Result(**fields))


def test_delivery_row_survives_repeat_and_counts_attempts(url: str) -> None:
    with session_scope(url) as s:
        sid, rev = repo.mark_study_queued(s, STUDY, amended=False)
        mv = repo.ensure_model_version(s, name="m", version="1", sha256="c" * 64, threshold=0.5)
        rid = repo.save_result(
            s,
            repo.ResultRecord(
                study_id=sid,
                model_version_id=mv,
                revision=rev,
                status=ResultStatus.COMPLETE,
                probability=0.1,
                finding=False,
                threshold=0.5,
                ood=False,
                outside_intended_use=False,
            ),
            [],
        )
        did = repo.ensure_delivery(s, rid, "PACS@127.0.0.1:104")
        repo.record_delivery_attempt(s, did, ok=False, error="ConnectionRefused")
    with session_scope(url) as s:
        assert repo.ensure_delivery(s, rid, "PACS@127.0.0.1:104") == did
        repo.record_delivery_attempt(s, did, ok=True)
    with session_scope(url) as s:
        d = s.get(Delivery, did)
        assert (d.status, d.attempts, d.last_error) == (DeliveryStatus.SENT, 2, None)
        assert repo.studies_by_status(s) == {"queued": 1}
