"""Each ``pneumo reprocess`` selector, alone and combined, on PostgreSQL (seeded rows)."""

from __future__ import annotations

import argparse
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from db import repository as repo
from db.batches import Selector, StatusChoice, select_studies
from db.engine import session_scope
from db.models import ResultStatus, StudyStatus
from db.queries import DateField, Finding
from tests.batches.conftest import seed

pytestmark = pytest.mark.postgres


@pytest.fixture
def studies(pg_url: str) -> dict[str, tuple[int, str]]:
    return {
        "pneumonia_v1": seed(pg_url, flags=("outside-intended-use",), study_date=date(2024, 1, 10),
                             received_at=datetime(2024, 3, 1, 12, tzinfo=UTC)),
        "normal_v2": seed(pg_url, model="2.0.0", finding=False, study_date=date(2024, 2, 10)),
        "dead_letter": seed(pg_url, status=StudyStatus.DEAD_LETTER, model=None),
        "failed": seed(pg_url, status=StudyStatus.FAILED, model=None),
        "skipped_v1": seed(pg_url, finding=None, result_status=ResultStatus.NO_USABLE_IMAGE,
                           study_date=date(2023, 12, 1)),
        "never_dispatched": seed(pg_url, status=StudyStatus.RECEIVING, revision=0, model=None),
    }  # fmt: skip


def _names(pg_url: str, studies: dict[str, tuple[int, str]], selector: Selector) -> set[str]:
    by_id = {study_id: name for name, (study_id, _) in studies.items()}
    with session_scope(pg_url) as session:
        return {by_id[i] for i in select_studies(session, selector).study_ids}


def test_study_uids_one_and_several(pg_url: str, studies: dict[str, tuple[int, str]]) -> None:
    uid = studies["normal_v2"][1]
    assert _names(pg_url, studies, Selector(study_uids=(uid,))) == {"normal_v2"}
    two = (uid, studies["dead_letter"][1])
    assert _names(pg_url, studies, Selector(study_uids=two)) == {"normal_v2", "dead_letter"}


def test_study_and_received_dates(pg_url: str, studies: dict[str, tuple[int, str]]) -> None:
    since, until = date(2024, 1, 1), date(2024, 1, 31)
    assert _names(pg_url, studies, Selector(since=since, until=until)) == {"pneumonia_v1"}
    assert _names(pg_url, studies, Selector(until=date(2023, 12, 31))) == {"skipped_v1"}
    received = Selector(since=date(2024, 3, 1), until=date(2024, 3, 1),
                        date_field=DateField.RECEIVED)  # fmt: skip
    assert _names(pg_url, studies, received) == {"pneumonia_v1"}


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (StatusChoice.FAILED, {"failed"}),
        (StatusChoice.DEAD_LETTER, {"dead_letter"}),
        (StatusChoice.SKIPPED, {"skipped_v1"}),
        (StatusChoice.DONE, {"pneumonia_v1", "normal_v2", "skipped_v1"}),
        (StatusChoice.ALL, {"pneumonia_v1", "normal_v2", "skipped_v1", "failed", "dead_letter"}),
    ],
)
def test_status(
    pg_url: str, studies: dict[str, tuple[int, str]], status: StatusChoice, expected: set[str]
) -> None:
    assert _names(pg_url, studies, Selector(status=status)) == expected


def test_finding_flag_and_model_version(pg_url: str, studies: dict[str, tuple[int, str]]) -> None:
    assert _names(pg_url, studies, Selector(finding=Finding.PNEUMONIA)) == {"pneumonia_v1"}
    assert _names(pg_url, studies, Selector(finding=Finding.NORMAL)) == {"normal_v2"}
    assert _names(pg_url, studies, Selector(flag="outside-intended-use")) == {"pneumonia_v1"}
    # results made by another model than the one named (either spelling); no result: not selected
    other = {"pneumonia_v1", "skipped_v1"}
    assert _names(pg_url, studies, Selector(model_version="2.0.0")) == other
    assert _names(pg_url, studies, Selector(model_version="pneumonet-2.0.0")) == other


def test_all_and_combinations(pg_url: str, studies: dict[str, tuple[int, str]]) -> None:
    everything = _names(pg_url, studies, Selector(everything=True))
    assert everything == set(studies) - {"never_dispatched"}  # realtime will run that one
    combined = Selector(status=StatusChoice.DONE, model_version="2.0.0", since=date(2024, 1, 1))
    assert _names(pg_url, studies, combined) == {"pneumonia_v1"}
    with pytest.raises(ValueError, match="selector"):
        _names(pg_url, studies, Selector())


def test_purged_studies_are_left_out(pg_url: str, studies: dict[str, tuple[int, str]]) -> None:
    study_id, uid = studies["normal_v2"]
    with session_scope(pg_url) as session:
        repo.record_instance(session, repo.InstanceRecord(
            uid, "1.2.3.1", "1.2.3.2", "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1",
            "/gone.dcm", 1, "T", datetime.now(UTC)))  # fmt: skip
        repo.mark_pixels_purged(session, study_id, ["1.2.3.2"])
    with session_scope(pg_url) as session:
        selection = select_studies(session, Selector(study_uids=(uid,)))
    assert selection.study_ids == () and selection.purged == (uid,)


def test_studies_file_and_uids_combine(tmp_path: Path) -> None:
    from pneumo.commands import operator

    parser = argparse.ArgumentParser()
    operator.register(parser.add_subparsers())
    listing = tmp_path / "uids.txt"
    listing.write_text("# from the audit\n1.2.3.4\n\n1.2.3.5  # second\n")
    args = parser.parse_args(["reprocess", "--study-uid", "1.2.3.4", "--studies-file",
                              str(listing), "--status", "done", "--max-rate", "5/s"])  # fmt: skip
    selector = operator._selector(args)
    assert selector.study_uids == ("1.2.3.4", "1.2.3.5")
    assert selector.status is StatusChoice.DONE and args.max_rate == 5.0
    with pytest.raises(SystemExit):
        parser.parse_args(["reprocess", "--all", "--max-rate", "0"])
