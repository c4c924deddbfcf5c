"""What a new model version changed: ``pneumo diff --from-version A --to-version B``.

Over the studies both versions scored (each version's newest result of the study,
with a probability and a finding), :func:`version_diff` reports the studies whose
finding changed, the shift of the probability (B − A), and, on the studies a
radiologist gave a final label, each version's sensitivity and specificity.

Ground truth is the study's newest feedback row that has a final label (any
revision; later rows supersede): ``pneumonia`` is positive, ``no-pneumonia`` and
``other-finding`` are negative (for pneumonia). Agree/disagree without a final
label is not used.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.access import Feedback, FinalLabel
from db.models import ModelVersion, Result, Study, model_label
from db.queries import model_version_matches

__all__ = [
    "MOVED_BY",
    "Accuracy",
    "ChangedStudy",
    "UnknownVersion",
    "VersionDiff",
    "version_diff",
]

MOVED_BY = 0.1
"""A probability that moved by more than this (either way) counts as moved."""

POSITIVE_LABELS = frozenset({FinalLabel.PNEUMONIA})
"""Final labels that are pneumonia; every other final label is negative for it."""


class UnknownVersion(ValueError):
    """A version no result-producing model row has; ``known`` lists the labels there are."""

    def __init__(self, label: str, known: Sequence[str]) -> None:
        self.label = label
        self.known = tuple(known)
        listing = ", ".join(self.known) or "none"
        super().__init__(f"unknown model version {label!r} (known: {listing})")

    @classmethod
    def listing_known(cls, session: Session, label: str) -> UnknownVersion:
        """The error for ``label``, listing every model version's label in the database."""
        every = session.execute(
            select(ModelVersion.name, ModelVersion.version).order_by(ModelVersion.id)
        ).all()
        return cls(label, list(dict.fromkeys(model_label(n, v) for n, v in every)))


@dataclass(frozen=True)
class ChangedStudy:
    """A study whose finding differs between the two versions."""

    study_uid: str
    from_probability: float
    to_probability: float
    from_finding: bool
    to_finding: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "from_probability": self.from_probability,
            "to_probability": self.to_probability,
            "from_finding": self.from_finding,
            "to_finding": self.to_finding,
        }


@dataclass(frozen=True)
class Accuracy:
    """One version's findings against the radiologists' final labels."""

    positives: int
    negatives: int
    true_positives: int
    true_negatives: int

    @property
    def n(self) -> int:
        return self.positives + self.negatives

    @property
    def sensitivity(self) -> float | None:
        return self.true_positives / self.positives if self.positives else None

    @property
    def specificity(self) -> float | None:
        return self.true_negatives / self.negatives if self.negatives else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "positives": self.positives,
            "negatives": self.negatives,
            "true_positives": self.true_positives,
            "true_negatives": self.true_negatives,
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
        }


@dataclass(frozen=True)
class VersionDiff:
    """The comparison of two model versions on the studies both scored."""

    from_version: str
    to_version: str
    studies: int
    changed: tuple[ChangedStudy, ...]
    mean_shift: float | None
    median_shift: float | None
    moved: int
    """Studies whose probability moved by more than :data:`MOVED_BY`."""
    from_accuracy: Accuracy
    to_accuracy: Accuracy

    @property
    def moved_share(self) -> float | None:
        return self.moved / self.studies if self.studies else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "from_version": self.from_version,
            "to_version": self.to_version,
            "studies": self.studies,
            "changed_count": len(self.changed),
            "changed": [c.as_dict() for c in self.changed],
            "mean_shift": self.mean_shift,
            "median_shift": self.median_shift,
            "moved_by": MOVED_BY,
            "moved": self.moved,
            "moved_share": self.moved_share,
            "ground_truth": "newest feedback final label; other-finding counts as negative",
            "from_accuracy": self.from_accuracy.as_dict(),
            "to_accuracy": self.to_accuracy.as_dict(),
        }


def _resolve(session: Session, label: str) -> tuple[str, list[int]]:
    """The display label and the model-version ids ``label`` names.

    Raises:
        UnknownVersion: no model version is called ``label``.
    """
    rows = session.execute(
        select(ModelVersion.id, ModelVersion.name, ModelVersion.version)
        .where(model_version_matches(label))
        .order_by(ModelVersion.id)
    ).all()
    if not rows:
        raise UnknownVersion.listing_known(session, label)
    names = dict.fromkeys(model_label(name, version) for _, name, version in rows)
    return ",".join(names), [row[0] for row in rows]


def _newest_scores(session: Session, ids: list[int]) -> dict[int, tuple[str, float, bool]]:
    """Study id -> (UID, probability, finding) of the newest result by one of ``ids``,
    for studies whose newest such result has both."""
    newest = (
        select(func.max(Result.id))
        .where(Result.model_version_id.in_(ids))
        .group_by(Result.study_id)
    )
    stmt = (
        select(Result.study_id, Study.study_uid, Result.probability, Result.finding)
        .join(Study, Study.id == Result.study_id)
        .where(Result.id.in_(newest), Result.probability.is_not(None), Result.finding.is_not(None))
    )
    scores: dict[int, tuple[str, float, bool]] = {}
    for study_id, uid, probability, finding in session.execute(stmt).all():
        if probability is not None and finding is not None:  # the WHERE says so; mypy cannot
            scores[study_id] = (uid, float(probability), bool(finding))
    return scores


def _final_labels(session: Session, study_ids: list[int]) -> dict[int, bool]:
    """Study id -> pneumonia (True) or not, from its newest feedback with a final label."""
    truth: dict[int, bool] = {}
    if not study_ids:
        return truth
    stmt = (
        select(Feedback.study_id, Feedback.final_label)
        .where(Feedback.study_id.in_(study_ids), Feedback.final_label.is_not(None))
        .order_by(Feedback.created_at, Feedback.id)
    )
    for study_id, label in session.execute(stmt).all():
        truth[study_id] = label in POSITIVE_LABELS  # later rows supersede
    return truth


def _accuracy(findings: dict[int, bool], truth: dict[int, bool]) -> Accuracy:
    positives = [sid for sid, label in truth.items() if label]
    negatives = [sid for sid, label in truth.items() if not label]
    return Accuracy(
        positives=len(positives),
        negatives=len(negatives),
        true_positives=sum(1 for sid in positives if findings[sid]),
        true_negatives=sum(1 for sid in negatives if not findings[sid]),
    )


def version_diff(session: Session, from_version: str, to_version: str) -> VersionDiff:
    """Compare ``to_version`` with ``from_version`` ("1.0.0" or "pneumonet-1.0.0").

    Raises:
        UnknownVersion: either version has no model row.
        ValueError: both name the same model version.
    """
    from_label, from_ids = _resolve(session, from_version)
    to_label, to_ids = _resolve(session, to_version)
    if set(from_ids) & set(to_ids):
        raise ValueError(f"{from_version!r} and {to_version!r} name the same model version")
    a = _newest_scores(session, from_ids)
    b = _newest_scores(session, to_ids)
    common = sorted(a.keys() & b.keys())
    shifts = [b[sid][1] - a[sid][1] for sid in common]
    changed = tuple(
        ChangedStudy(a[sid][0], a[sid][1], b[sid][1], a[sid][2], b[sid][2])
        for sid in common
        if a[sid][2] != b[sid][2]
    )
    truth = _final_labels(session, common)
    return VersionDiff(
        from_version=from_label,
        to_version=to_label,
        studies=len(common),
        changed=changed,
        mean_shift=statistics.fmean(shifts) if shifts else None,
        median_shift=statistics.median(shifts) if shifts else None,
        moved=sum(1 for s in shifts if abs(s) > MOVED_BY),
        from_accuracy=_accuracy({sid: a[sid][2] for sid in common}, truth),
        to_accuracy=_accuracy({sid: b[sid][2] for sid in common}, truth),
    )
