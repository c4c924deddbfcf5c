"""Production monitoring: does what the model sees still look like what it was validated on?

Labels arrive late or never in production, so drift is watched on what is always
there (issue 12):

* the **score distribution** -- the population stability index (PSI) of each
  week's calibrated probabilities against the validation reference, on ten bins
  at the reference's deciles (PSI < 0.1 stable, 0.1-0.25 moderate, > 0.25 a
  shift worth a look: the usual credit-scoring reading of the index);
* the **not-a-chest rate** and the **outside-intended-use rate** per week (a new
  modality routed to the worker, a changed age mix);
* where radiologists confirmed results, **sensitivity and specificity** on those.

Pure functions over plain values: the CLI (``pneumo monitor``) reads them from
the database and writes the JSON summary and plots.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_PSI_ALERT",
    "ScoredResult",
    "WeekSummary",
    "population_stability_index",
    "weekly_summaries",
]

DEFAULT_PSI_ALERT = 0.25
"""PSI above which a week is reported as drifted."""

_EPS = 1e-4  # floor for empty bins: PSI is infinite otherwise


@dataclass(frozen=True)
class ScoredResult:
    """One production result, as monitoring needs it (no patient data)."""

    created_at: dt.datetime
    probability: float | None  # None: nothing scored (e.g. no usable image)
    not_chest: bool
    outside_intended_use: bool
    confirmed: bool | None = None  # a radiologist's read: pneumonia or not (None: unknown)
    finding: bool | None = None  # what the model reported


@dataclass(frozen=True)
class WeekSummary:
    """One ISO week of production results."""

    week: str  # ISO year-week, e.g. "2026-W48"
    n: int
    n_scored: int
    psi: float | None  # None: too few scored results to compare (< 20)
    not_chest_rate: float
    outside_intended_use_rate: float
    sensitivity: float | None  # on radiologist-confirmed results only
    specificity: float | None
    drift: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def population_stability_index(
    reference: Sequence[float] | np.ndarray, current: Sequence[float] | np.ndarray, bins: int = 10
) -> float:
    """PSI of ``current`` against ``reference``, on bins at the reference's quantiles.

    Raises:
        ValueError: ``reference`` or ``current`` is empty.
    """
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    if ref.size == 0 or cur.size == 0:
        raise ValueError("reference and current: need at least one score each")
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    r = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=edges.size + 1)
    c = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=edges.size + 1)
    rp = np.maximum(r / ref.size, _EPS)
    cp = np.maximum(c / cur.size, _EPS)
    return float(np.sum((cp - rp) * np.log(cp / rp)))


def _rate(hits: int, n: int) -> float | None:
    return hits / n if n else None


def weekly_summaries(
    results: Sequence[ScoredResult],
    reference: Sequence[float] | np.ndarray,
    psi_alert: float = DEFAULT_PSI_ALERT,
    min_scored: int = 20,
) -> list[WeekSummary]:
    """One :class:`WeekSummary` per ISO week that has results, oldest first."""
    weeks: dict[str, list[ScoredResult]] = {}
    for r in sorted(results, key=lambda r: r.created_at):
        iso = r.created_at.isocalendar()
        weeks.setdefault(f"{iso.year}-W{iso.week:02d}", []).append(r)
    out = []
    for week, rows in weeks.items():
        scores = [r.probability for r in rows if r.probability is not None]
        psi = population_stability_index(reference, scores) if len(scores) >= min_scored else None
        confirmed = [r for r in rows if r.confirmed is not None and r.finding is not None]
        pos = [r for r in confirmed if r.confirmed]
        neg = [r for r in confirmed if not r.confirmed]
        out.append(
            WeekSummary(
                week=week,
                n=len(rows),
                n_scored=len(scores),
                psi=psi,
                not_chest_rate=sum(r.not_chest for r in rows) / len(rows),
                outside_intended_use_rate=sum(r.outside_intended_use for r in rows) / len(rows),
                sensitivity=_rate(sum(bool(r.finding) for r in pos), len(pos)),
                specificity=_rate(sum(not r.finding for r in neg), len(neg)),
                drift=psi is not None and psi > psi_alert,
            )
        )
    return out
