"""Result history and model-version diffs on PostgreSQL: ``db.queries.study_history``,
``db.diff.version_diff``, and the real ``pneumo results --history`` / ``pneumo diff``.

Hand-made data (A = pneumonet-1.0.0, B = pneumonet-1.1.0, probability A -> B):

| study | A              | B          | shift | final label (newest)          |
|-------|----------------|------------|-------|-------------------------------|
| s1    | 0.2 none       | 0.6 PNEU   | +0.40 | pneumonia                     |
| s2    | 0.7 PNEU       | 0.75 PNEU  | +0.05 | no-pneumonia                  |
| s3    | 0.9 PNEU       | 0.3 none   | -0.60 | other-finding (was pneumonia) |
| s4    | 0.1 none       | 0.15 none  | +0.05 | no-pneumonia                  |
| s5    | 0.5 PNEU       | —          |       | pneumonia (not compared)      |
| s6    | —              | 0.5 PNEU   |       |                               |
| s7    | 0.4 -> 0.8 PNEU| 0.85 PNEU  | +0.05 | no-pneumonia, then label-less |
| s8    | 0.3 none       | no image   |       |                               |
| s9    | 0.6 PNEU       | 0.62 PNEU  | +0.02 | agree only (no label)         |
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from db import migrate
from db import repository as repo
from db.access import Agreement, Feedback, FinalLabel, Role
from db.diff import UnknownVersion, version_diff
from db.engine import session_scope
from db.models import Result, ResultStatus, Study, StudyStatus
from db.queries import StudyFilter, study_history
from pneumo.cli import main
from pneumo.exit_codes import ExitCode
from tests.db.postgres import throwaway_database

pytestmark = pytest.mark.postgres

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
A, B = "1.0.0", "1.1.0"

# study -> [(version, revision, probability or None)]; finding = probability >= 0.5
PLAN: dict[str, list[tuple[str, int, float | None]]] = {
    "s1": [(A, 1, 0.2), (B, 2, 0.6)],
    "s2": [(A, 1, 0.7), (B, 2, 0.75)],
    "s3": [(A, 1, 0.9), (B, 2, 0.3)],
    "s4": [(A, 1, 0.1), (B, 2, 0.15)],
    "s5": [(A, 1, 0.5)],
    "s6": [(B, 1, 0.5)],
    "s7": [(A, 1, 0.4), (A, 2, 0.8), (B, 3, 0.85)],
    "s8": [(A, 1, 0.3), (B, 2, None)],
    "s9": [(A, 1, 0.6), (B, 2, 0.62)],
}
# (study, agreement, final label) in the order given
FEEDBACK: list[tuple[str, Agreement, FinalLabel | None]] = [
    ("s1", Agreement.DISAGREE, FinalLabel.PNEUMONIA),
    ("s2", Agreement.DISAGREE, FinalLabel.NO_PNEUMONIA),
    ("s3", Agreement.AGREE, FinalLabel.PNEUMONIA),
    ("s3", Agreement.DISAGREE, FinalLabel.OTHER_FINDING),  # supersedes: negative
    ("s4", Agreement.AGREE, FinalLabel.NO_PNEUMONIA),
    ("s5", Agreement.AGREE, FinalLabel.PNEUMONIA),
    ("s7", Agreement.DISAGREE, FinalLabel.NO_PNEUMONIA),
    ("s7", Agreement.AGREE, None),  # no label: the earlier one stands
    ("s9", Agreement.AGREE, None),
]


def uid(name: str) -> str:
    return f"2.25.77{name[1:]}"


@pytest.fixture(scope="module")
def url(postgres_url: str) -> Iterator[str]:
    with throwaway_database(postgres_url) as db_url:
        migrate.upgrade(db_url)
        _seed(db_url)
        yield db_url


def _seed(url: str) -> None:
    with session_scope(url) as s:
        models = {
            v: repo.ensure_model_version(
                s, name="pneumonet", version=v, sha256=c * 64, threshold=0.5
            )
            for v, c in ((A, "a"), (B, "b"))
        }
        study_ids: dict[str, int] = {}
        for n, (name, runs) in enumerate(PLAN.items()):
            sid = repo.ensure_study(s, uid(name), repo.StudyHeader(patient_id=f"P{n}"))
            study_ids[name] = sid
            s.execute(
                update(Study)
                .where(Study.id == sid)
                .values(status=StudyStatus.DONE, revision=runs[-1][1],
                        received_at=T0 + timedelta(hours=n))
            )  # fmt: skip
            for k, (version, revision, p) in enumerate(runs):
                result_id = repo.save_result(
                    s,
                    repo.ResultRecord(
                        sid, models[version], revision,
                        ResultStatus.COMPLETE if p is not None else ResultStatus.NO_USABLE_IMAGE,
                        p, None if p is None else p >= 0.5, 0.5, False, False,
                    ),
                    [],
                )  # fmt: skip
                created = T0 + timedelta(days=1, hours=n, minutes=k)
                s.execute(update(Result).where(Result.id == result_id).values(created_at=created))
        for k, (name, agreement, label) in enumerate(FEEDBACK):
            s.add(
                Feedback(
                    study_id=study_ids[name], revision=1, result_id=None, agreement=agreement,
                    final_label=label, user="dr", role=Role.RADIOLOGIST,
                    created_at=T0 + timedelta(days=2, minutes=k),
                )
            )  # fmt: skip


def test_history_lists_every_revision_newest_first(url: str) -> None:
    with session_scope(url) as s:
        rows = study_history(s, StudyFilter(study_uid=uid("s7")))
        everything = study_history(s, StudyFilter(), limit=100)
    assert [(r.revision, r.model, r.probability) for r in rows] == [
        (3, "pneumonet-1.1.0", 0.85),
        (2, "pneumonet-1.0.0", 0.8),
        (1, "pneumonet-1.0.0", 0.4),
    ]
    assert rows[0].created_at > rows[1].created_at > rows[2].created_at
    # every result once, studies newest received first, revisions descending within each
    assert len(everything) == sum(len(runs) for runs in PLAN.values())
    studies = list(dict.fromkeys(r.study_uid for r in everything))
    assert studies == [uid(name) for name in reversed(PLAN)]
    for study in studies:
        revisions = [r.revision for r in everything if r.study_uid == study]
        assert revisions == sorted(revisions, reverse=True)


def test_diff_changed_studies_shift_and_accuracy(url: str) -> None:
    with session_scope(url) as s:
        d = version_diff(s, A, "pneumonet-1.1.0")
    assert (d.from_version, d.to_version) == ("pneumonet-1.0.0", "pneumonet-1.1.0")
    assert d.studies == 6  # s1 s2 s3 s4 s7 s9: s5/s6 by one only, s8 no probability by B
    assert [(c.study_uid, c.from_probability, c.to_probability, c.from_finding, c.to_finding)
            for c in d.changed] == [
        (uid("s1"), 0.2, 0.6, False, True),
        (uid("s3"), 0.9, 0.3, True, False),
    ]  # fmt: skip
    assert d.mean_shift == pytest.approx((0.4 + 0.05 - 0.6 + 0.05 + 0.05 + 0.02) / 6)
    assert d.median_shift == pytest.approx(0.05)
    assert d.moved == 2 and d.moved_share == pytest.approx(2 / 6)
    # labelled: s1 positive; s2, s3 (other-finding), s4, s7 negative; s9 no label
    a, b = d.from_accuracy, d.to_accuracy
    assert (a.n, a.positives, a.negatives) == (b.n, b.positives, b.negatives) == (5, 1, 4)
    assert (a.true_positives, a.true_negatives) == (0, 1)  # only s4 right
    assert (a.sensitivity, a.specificity) == (0.0, 0.25)
    assert (b.true_positives, b.true_negatives) == (1, 2)  # s1; s3, s4
    assert (b.sensitivity, b.specificity) == (1.0, 0.5)


def test_unknown_version_lists_the_known_ones(url: str) -> None:
    with session_scope(url) as s, pytest.raises(UnknownVersion) as caught:
        version_diff(s, "9.9.9", B)
    assert caught.value.known == ("pneumonet-1.0.0", "pneumonet-1.1.0")
    with session_scope(url) as s, pytest.raises(ValueError, match="same model version"):
        version_diff(s, A, "pneumonet-1.0.0")


def test_cli(url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PNEUMO_DATABASE_URL", url)
    assert main(["diff", "--from-version", A, "--to-version", B, "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["changed_count"] == 2 and out["to_accuracy"]["sensitivity"] == 1.0
    assert main(["diff", "--from-version", A, "--to-version", B, "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("study_uid,from_finding") and len(lines) == 3
    assert main(["diff", "--from-version", A, "--to-version", B]) == 0
    assert "2 changed finding" in capsys.readouterr().out
    assert main(["diff", "--from-version", "9.9.9", "--to-version", B]) == ExitCode.USAGE == 2
    assert "known: pneumonet-1.0.0, pneumonet-1.1.0" in capsys.readouterr().err
    assert main(["results", "--history", "--study-uid", uid("s7"), "--format", "json"]) == 0
    history = json.loads(capsys.readouterr().out)
    assert [h["revision"] for h in history] == [3, 2, 1]
    assert main(["results", "--history", "--study-uid", uid("s7")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + 3 and "pneumonet-1.1.0" in table[2]
