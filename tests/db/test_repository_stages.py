"""The repository reads and writes the pipeline stages use, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from db import migrate
from db import repository as repo
from db.engine import session_scope
from db.models import DeliveryStatus, ResultStatus
from tests.db.test_repository import _instance as _repository_instance

STUDY = "1.2.826.0.1.3680043.8.498.2"


def _instance(n: int) -> repo.InstanceRecord:
    return _repository_instance(n, study=STUDY)


@pytest.fixture
def url(db_url: str) -> str:
    migrate.upgrade(db_url)
    return db_url


def _result(url: str, sr_path: str | None, sc_paths: list[str | None]) -> int:
    """A study with one instance per ``sc_paths`` entry and a result naming those files."""
    with session_scope(url) as s:
        ids = [repo.record_instance(s, _instance(n)) for n in range(len(sc_paths))]
        sid, rev = repo.mark_study_queued(s, STUDY, amended=False)
        mv = repo.ensure_model_version(s, name="m", version="1", sha256="c" * 64, threshold=0.5)
        record = repo.ResultRecord(
            study_id=sid,
            model_version_id=mv,
            revision=rev,
            status=ResultStatus.COMPLETE,
            probability=0.7,
            finding=True,
            threshold=0.5,
            ood=False,
            outside_intended_use=False,
            sr_path=sr_path,
        )
        images = [
            repo.ImageOutcome(i, 0.7, 0.1, True, True, sc_path=p)
            for i, p in zip(ids, sc_paths, strict=True)
        ]
        return repo.save_result(s, record, images)


def test_study_files_in_recorded_order(url: str) -> None:
    with session_scope(url) as s:
        ids = [repo.record_instance(s, _instance(n)) for n in (3, 1, 2)]
        study_id = repo.ensure_study(s, STUDY)
    with session_scope(url) as s:
        files = repo.study_files(s, study_id)
        assert repo.study_files(s, study_id + 100) is None
    assert files is not None and files.study_uid == STUDY and files.study_id == study_id
    assert [f.instance_id for f in files.instances] == ids
    assert [f.path for f in files.instances] == ["/spool/3.dcm", "/spool/1.dcm", "/spool/2.dcm"]
    assert files.instances[0].sop_instance_uid == f"{STUDY}.1.3"


def test_study_without_instances_has_no_files(url: str) -> None:
    with session_scope(url) as s:
        study_id = repo.ensure_study(s, STUDY)
        files = repo.study_files(s, study_id)
    assert files is not None and files.instances == ()


def test_result_file_paths_sr_first_then_scs(url: str) -> None:
    result_id = _result(url, "/r/sr.dcm", ["/r/sc0.dcm", None, "/r/sc2.dcm"])
    with session_scope(url) as s:
        assert repo.result_file_paths(s, result_id) == ["/r/sr.dcm", "/r/sc0.dcm", "/r/sc2.dcm"]
        assert repo.result_file_paths(s, result_id + 100) is None


def test_result_without_sr_names_no_files(url: str) -> None:
    result_id = _result(url, None, [None])
    with session_scope(url) as s:
        assert repo.result_file_paths(s, result_id) == []


def test_delivery_status_follows_attempts(url: str) -> None:
    result_id = _result(url, "/r/sr.dcm", [])
    with session_scope(url) as s:
        delivery_id = repo.ensure_delivery(s, result_id, "PACS@127.0.0.1:104")
        assert repo.delivery_status(s, delivery_id) is DeliveryStatus.PENDING
        repo.record_delivery_attempt(s, delivery_id, ok=False, error="refused")
        assert repo.delivery_status(s, delivery_id) is DeliveryStatus.FAILED
        repo.record_delivery_attempt(s, delivery_id, ok=True)
        assert repo.delivery_status(s, delivery_id) is DeliveryStatus.SENT
        assert repo.delivery_status(s, delivery_id + 100) is None
