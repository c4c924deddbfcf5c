"""Stage 4, assess: from the model's verdicts to the study's result (a pure function).

The study-level policy lives here and nowhere else: the probability is the
highest over the chest radiographs, the finding is "any chest radiograph at or
above threshold", an image the guard rejects does not count and flags the
study, and an age outside the intended population flags it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from db.models import ResultStatus
from worker.flags import ResultFlag
from worker.intended_use import AgeEvidence, outside_intended_use
from worker.predictor import Prediction

__all__ = ["Assessment", "assess", "summary_text"]


@dataclass(frozen=True)
class Assessment:
    """The result of one study, before any file or row is written."""

    status: ResultStatus
    probability: float | None
    """Highest calibrated probability over the chest radiographs; None when there is none."""
    finding: bool | None
    threshold: float
    ood: bool
    """Some read image was judged not a chest radiograph."""
    outside_intended_use: bool
    max_age_years: int | None
    """The upper age that was applied (None: no limit)."""
    flags: tuple[ResultFlag, ...]
    summary: str


def summary_text(probability: float | None, threshold: float, finding: bool | None) -> str:
    """The one-sentence result, as the SR and the result row carry it."""
    if probability is None:
        return "No image of this study could be assessed by the model."
    verdict = "Pneumonia suspected" if finding else "No pneumonia detected"
    relation = ">=" if finding else "<"
    return f"{verdict} (probability {probability:.4f} {relation} threshold {threshold:.4f})."


def assess(
    predictions: Sequence[Prediction],
    age: AgeEvidence,
    *,
    threshold: float,
    max_age_years: int | None,
) -> Assessment:
    """Status, probability, finding and flags of a study from its images' predictions.

    ``predictions`` holds one entry per image the model read (chest or not);
    ``age`` is what the study header says about the patient. Pure: no I/O.
    """
    chest = [p for p in predictions if p.is_chest]
    outside = outside_intended_use(age, max_age_years)
    ood = len(chest) < len(predictions)
    probability = max((float(p.probability) for p in chest), default=None)
    finding = None if probability is None else any(p.finding for p in chest)
    flags = tuple(
        flag
        for flag, on in (
            (ResultFlag.OUTSIDE_INTENDED_USE, outside),
            (ResultFlag.NOT_CHEST, ood),
            (ResultFlag.NO_USABLE_IMAGE, not chest),
        )
        if on
    )
    return Assessment(
        status=ResultStatus.COMPLETE if chest else ResultStatus.NO_USABLE_IMAGE,
        probability=probability,
        finding=finding,
        threshold=threshold,
        ood=ood,
        outside_intended_use=outside,
        max_age_years=max_age_years,
        flags=flags,
        summary=summary_text(probability, threshold, finding),
    )
