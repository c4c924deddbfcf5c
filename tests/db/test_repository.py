"""Repository writes on SQLite and PostgreSQL: upserts never duplicate, revisions advance."""

from __future__ import annotations

import socket
import stat
import time
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError

from db import migrate
from db import repository as repo
from db.engine import CONNECT_TIMEOUT_SECONDS, make_engine, session_scope
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


def test_reused_sop_uid_in_another_study_is_refused_study_a_keeps_it(url: str) -> None:
    other = "1.2.826.0.1.3680043.8.498.2"
    with session_scope(url) as s:
        kept = repo.record_instance(s, _instance(1))
        claimed = replace(_instance(1), study_uid=other, series_uid=f"{other}.1", path="/b.dcm")
        refused = repo.record_instance(s, claimed)
    assert kept is not None and refused is None
    with session_scope(url) as s:
        row = s.execute(select(Instance)).scalar_one()
        study_a = s.execute(select(Study).where(Study.study_uid == STUDY)).scalar_one()
        study_b = s.execute(select(Study).where(Study.study_uid == other)).scalar_one()
        assert (row.study_id, row.path) == (study_a.id, "/spool/1.dcm")
        assert len(study_a.instances) == 1 and study_b.instances == []
    with session_scope(url) as s:  # study A re-sending its own instance still refreshes it
        assert repo.record_instance(s, replace(_instance(1), size=7)) == kept


def test_sqlite_file_and_the_folder_created_for_it_are_private(tmp_path: Path) -> None:
    database = tmp_path / "data" / "deeper" / "pneumo.db"
    migrate.upgrade(f"sqlite:///{database}")
    for folder in (database.parent, database.parent.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for file in database.parent.iterdir():  # pneumo.db and its -wal/-shm
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file.name


def test_postgres_connect_gives_up_after_the_timeout() -> None:
    # A peer that accepts TCP but never answers (a hung server, a black-holed
    # route): without connect_timeout the C-STORE handler would wait for ever.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        engine = make_engine(f"postgresql+psycopg://nobody@127.0.0.1:{port}/x")
        started = time.monotonic()
        with pytest.raises(OperationalError):
            engine.connect()
        elapsed = time.monotonic() - started
        engine.dispose()
    assert CONNECT_TIMEOUT_SECONDS - 1 <= elapsed < CONNECT_TIMEOUT_SECONDS + 5


def test_purge_queries_pick_old_finished_studies_and_mark_once(url: str) -> None:
    other = "1.2.826.0.1.3680043.8.498.3"
    with session_scope(url) as s:
        repo.record_instance(s, _instance(1))
        repo.record_instance(s, _instance(2))
        repo.record_instance(s, _instance(1, study=other))
        for uid, status in ((STUDY, StudyStatus.DONE), (other, StudyStatus.PROCESSING)):
            sid, _ = repo.mark_study_queued(s, uid, amended=False)
            study = s.get(Study, sid)
            study.status, study.received_at = status, datetime(2020, 1, 1, tzinfo=UTC)
    cutoff = datetime.now(UTC)
    with session_scope(url) as s:
        (candidate,) = repo.studies_to_purge(s, cutoff)  # the processing study is not one
        assert candidate.study_uid == STUDY
        assert repo.studies_to_purge(s, datetime(2019, 1, 1, tzinfo=UTC)) == []
        sops = [f"{STUDY}.1.1", f"{STUDY}.1.2"]
        assert repo.mark_pixels_purged(s, candidate.study_id, sops) == 2
        assert repo.mark_pixels_purged(s, candidate.study_id, sops) == 0  # already marked
    with session_scope(url) as s:
        assert repo.studies_to_purge(s, cutoff) == []
        assert repo.study_pixels_purged(s, STUDY) and not repo.study_pixels_purged(s, other)
        assert _count(url, Instance) == 3
