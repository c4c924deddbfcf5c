"""The one staff search (``db.queries``): every filter, every sort, keyset pages, the detail."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from db.engine import session_scope
from db.models import StudyStatus
from db.queries import (
    DateField,
    Finding,
    Sort,
    StudyFilter,
    model_versions,
    search_studies,
    study_detail,
)
from tests.api.seed import SeededStudy, seed


@pytest.fixture
def seeded(db_url: str, tmp_path: Path) -> tuple[str, list[SeededStudy]]:
    return db_url, seed(db_url, tmp_path)


def _uids(url: str, filters: StudyFilter, sort: Sort = Sort.NEWEST) -> list[str]:
    with session_scope(url) as s:
        return [r.study_uid for r in search_studies(s, filters, sort=sort, limit=100).rows]


def test_every_filter(seeded: tuple[str, list[SeededStudy]]) -> None:
    url, st = seeded
    u = [s.study_uid for s in st]
    newest_first = list(reversed(u))
    assert _uids(url, StudyFilter()) == newest_first
    assert _uids(url, StudyFilter(patient_id="P001")) == [u[3], u[0]]
    assert _uids(url, StudyFilter(accession="ACC002")) == [u[1]]
    assert _uids(url, StudyFilter(study_uid=u[2])) == [u[2]]
    assert _uids(url, StudyFilter(since=date(2026, 11, 2), until=date(2026, 11, 3))) == [u[2], u[1]]
    by_received = StudyFilter(
        since=date(2026, 11, 20), until=date(2026, 11, 20), date_field=DateField.RECEIVED
    )
    assert _uids(url, by_received) == newest_first
    assert _uids(url, StudyFilter(since=date(2026, 11, 21), date_field=DateField.RECEIVED)) == []
    assert _uids(url, StudyFilter(finding=Finding.PNEUMONIA)) == [u[3], u[0]]
    assert _uids(url, StudyFilter(finding=Finding.NORMAL)) == [u[2], u[1]]
    assert _uids(url, StudyFilter(finding=Finding.NOT_PROCESSED)) == [u[5], u[4]]
    assert _uids(url, StudyFilter(status=StudyStatus.QUEUED)) == [u[4]]
    assert _uids(url, StudyFilter(flag="outside-intended-use")) == [u[2]]
    assert _uids(url, StudyFilter(flag="no-usable-image")) == [u[5]]
    assert _uids(url, StudyFilter(flag="no-usable")) == []  # whole codes only
    assert _uids(url, StudyFilter(min_probability=0.8)) == [u[3], u[0]]
    assert _uids(url, StudyFilter(model_version="1.1.0")) == [u[3]]
    assert _uids(url, StudyFilter(model_version="pneumonet-1.0.0")) == [u[5], u[2], u[1], u[0]]
    assert _uids(
        url, StudyFilter(patient_id="P001", finding=Finding.PNEUMONIA, min_probability=0.85)
    ) == [u[0]]


def test_sorts(seeded: tuple[str, list[SeededStudy]]) -> None:
    url, st = seeded
    u = [s.study_uid for s in st]
    assert _uids(url, StudyFilter(), Sort.PROBABILITY) == [u[0], u[3], u[2], u[1], u[5], u[4]]
    assert _uids(url, StudyFilter(), Sort.TRIAGE) == [u[3], u[0], u[5], u[4], u[2], u[1]]


@pytest.mark.parametrize("sort", list(Sort))
def test_keyset_pages_cover_everything_once(
    seeded: tuple[str, list[SeededStudy]], sort: Sort
) -> None:
    url, _ = seeded
    everything = _uids(url, StudyFilter(), sort)
    paged: list[str] = []
    cursor = None
    with session_scope(url) as s:
        while True:
            page = search_studies(
                s, StudyFilter(), sort=sort, limit=4 if sort is Sort.NEWEST else 2, cursor=cursor
            )
            paged += [r.study_uid for r in page.rows]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
    assert paged == everything


def test_bad_arguments(seeded: tuple[str, list[SeededStudy]]) -> None:
    url, _ = seeded
    with session_scope(url) as s:
        with pytest.raises(ValueError, match="cursor"):
            search_studies(s, cursor="not-a-cursor")
        with pytest.raises(ValueError, match="limit"):
            search_studies(s, limit=0)
    with pytest.raises(ValueError, match="min_probability"):
        StudyFilter(min_probability=1.5)


def test_newest_result_and_deliveries(seeded: tuple[str, list[SeededStudy]]) -> None:
    url, st = seeded
    with session_scope(url) as s:
        row = search_studies(s, StudyFilter(study_uid=st[3].study_uid)).rows[0]
    assert (row.model, row.revision, row.probability, row.finding) == (
        "pneumonet-1.1.0",
        2,
        0.83,
        True,
    )
    assert row.deliveries == (("PACS@127.0.0.1:104", "sent"),)
    assert row.patient_id == "P001" and row.accession_number == "ACC004"


def test_study_detail(seeded: tuple[str, list[SeededStudy]]) -> None:
    url, st = seeded
    with session_scope(url) as s:
        lateral = study_detail(s, st[1].study_uid)
        revised = study_detail(s, st[3].study_uid)
        first = study_detail(s, st[0].study_uid)
        assert study_detail(s, "1.2.3.4") is None
        models = model_versions(s)
    assert lateral is not None and revised is not None and first is not None
    assert [(i.selection.value, i.skip_reason) for i in lateral.instances] == [
        ("selected", None),
        ("skipped", "lateral-view"),
    ]
    assert [r.revision for r in revised.results] == [2, 1]
    assert revised.newest is not None and revised.newest.model.sha256 == "b" * 64
    assert first.results[0].images[0].has_heatmap
    assert first.results[0].timings == {"select": 0.01, "predict": 0.2}
    assert first.results[0].deliveries[0].status == "sent"
    assert [m.label for m in models] == ["pneumonet-1.1.0", "pneumonet-1.0.0"]
