"""Binary-classification metrics with seeded bootstrap confidence intervals.

One function, :func:`compute_metrics`, used by ``pneumo evaluate``, by the
model card and by the notebook, so every figure the project reports is computed
the same way.

Conventions (all documented here because the numbers depend on them):

* Labels are 0 = NORMAL (negative), 1 = PNEUMONIA (positive). Probabilities
  are the model's (calibrated) probability of the positive class.
* An image is called positive when ``probability >= threshold`` -- the same
  rule as ``model.inference.Prediction.finding``.
* ``sensitivity`` = recall = TP / (TP + FN); ``specificity`` = TN / (TN + FP);
  ``precision`` = TP / (TP + FP); ``f1`` = 2 TP / (2 TP + FP + FN).
* ``roc_auc`` is the area under the ROC curve (Mann-Whitney statistic, ties
  count one half); ``pr_auc`` is *average precision*
  (sum over distinct thresholds of (R_n - R_{n-1}) * P_n, no interpolation),
  both identical to scikit-learn's ``roc_auc_score`` /
  ``average_precision_score``.
* ``brier`` = mean (probability - label)^2.
* ``ece`` (expected calibration error) of the positive-class probability:
  15 equal-width bins on [0, 1]; bin k holds probabilities in
  (k/15, (k+1)/15], the first bin also holds 0 (scikit-learn's
  ``calibration_curve(strategy="uniform")`` binning);
  ECE = sum over non-empty bins of (n_bin / n) * |mean(label) - mean(probability)|.
  This is the error the reliability diagram in ``model.plots`` shows.

Undefined values are NaN, never a silent 0: precision with no predicted
positive, sensitivity without positives, specificity without negatives, and
ROC AUC / PR AUC unless both classes are present. F1 is NaN only when there is
neither a positive nor a predicted positive. An empty input, labels other than
0/1 or probabilities outside [0, 1] raise :class:`MetricsError`.

Confidence intervals: stratified percentile bootstrap -- positives and
negatives are resampled separately with replacement, so every resample keeps
the observed class counts (and AUC stays defined). The 95 % interval is the
2.5th and 97.5th percentile of the resampled values, ignoring resamples in
which the metric is undefined. The generator is ``numpy.random.default_rng(seed)``,
so the same inputs and seed give the same intervals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ECE_BINS",
    "METRIC_NAMES",
    "ConfusionCounts",
    "MetricValue",
    "MetricsError",
    "calibration_bins",
    "compute_metrics",
    "confusion_counts",
    "expected_calibration_error",
    "metrics_to_json",
    "point_metrics",
    "roc_auc",
]

#: The metric keys, in the order reports list them.
METRIC_NAMES: tuple[str, ...] = (
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "roc_auc",
    "pr_auc",
    "brier",
    "ece",
)

#: Number of equal-width bins of the expected calibration error.
ECE_BINS = 15


class MetricsError(ValueError):
    """The labels or probabilities cannot be scored (empty, wrong values, ...)."""


@dataclass(frozen=True)
class MetricValue:
    """A point estimate and its 95 % bootstrap confidence interval."""

    value: float
    ci95: tuple[float, float]

    def to_json(self) -> dict[str, object]:
        """``{"value": x, "ci95": [lo, hi]}``; NaN becomes ``None`` (JSON has no NaN)."""
        return {"value": _json_float(self.value), "ci95": [_json_float(v) for v in self.ci95]}


@dataclass(frozen=True)
class ConfusionCounts:
    """Counts of the 2x2 confusion matrix at one threshold."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _validate(
    labels: Sequence[int] | np.ndarray, probabilities: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    p = np.asarray(probabilities, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1:
        raise MetricsError("labels and probabilities must be 1-D")
    if y.shape != p.shape:
        raise MetricsError(f"{y.size} labels but {p.size} probabilities")
    if y.size == 0:
        raise MetricsError("no samples to score")
    if not np.isin(y, (0, 1)).all():
        raise MetricsError("labels must be 0 (normal) or 1 (pneumonia)")
    if not np.isfinite(p).all() or p.min() < 0.0 or p.max() > 1.0:
        raise MetricsError("probabilities must be finite and within [0, 1]")
    return y.astype(np.int8), p


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def confusion_counts(
    labels: Sequence[int] | np.ndarray,
    probabilities: Sequence[float] | np.ndarray,
    threshold: float,
) -> ConfusionCounts:
    """The confusion matrix when ``probability >= threshold`` is called positive."""
    y, p = _validate(labels, probabilities)
    return _counts(y, p, threshold)


def _counts(y: np.ndarray, p: np.ndarray, threshold: float) -> ConfusionCounts:
    pred = p >= threshold
    pos = y == 1
    tp = int(np.count_nonzero(pred & pos))
    fp = int(np.count_nonzero(pred & ~pos))
    fn = int(np.count_nonzero(~pred & pos))
    return ConfusionCounts(tp=tp, fp=fp, tn=int(y.size) - tp - fp - fn, fn=fn)


def roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney U) identity; NaN for one class."""
    y, p = _validate(labels, probabilities)
    return _roc_auc(y, p)


def _roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    n_pos = int(np.count_nonzero(y))
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(p)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # Start index of each run of equal values.
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], values.size]
    run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def _average_precision(y: np.ndarray, p: np.ndarray) -> float:
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        return math.nan
    order = np.argsort(-p, kind="mergesort")
    p_sorted = p[order]
    y_sorted = y[order]
    # Only the last index of each group of tied scores is a threshold.
    last = np.r_[p_sorted[1:] != p_sorted[:-1], True]
    tps = np.cumsum(y_sorted)[last]
    predicted = (np.arange(y.size) + 1)[last]
    precision = tps / predicted
    recall = tps / n_pos
    recall_steps = np.diff(np.r_[0.0, recall])
    return float(np.sum(recall_steps * precision))


def expected_calibration_error(
    labels: np.ndarray, probabilities: np.ndarray, n_bins: int = ECE_BINS
) -> float:
    """ECE of the positive-class probability over ``n_bins`` equal-width bins (module docstring)."""
    y, p = _validate(labels, probabilities)
    return _ece(y, p, n_bins)


def calibration_bins(
    labels: np.ndarray, probabilities: np.ndarray, n_bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin (count, mean probability, observed positive fraction); NaN for empty bins.

    The bins are the ones :func:`expected_calibration_error` uses, so the
    reliability diagram shows exactly the quantity the ECE summarises.
    """
    y, p = _validate(labels, probabilities)
    return _calibration_bins(y, p, n_bins)


def _calibration_bins(
    y: np.ndarray, p: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_ids = np.searchsorted(edges[1:-1], p, side="left")  # (lo, hi], 0 in the first bin
    counts = np.bincount(bin_ids, minlength=n_bins).astype(np.float64)
    sum_p = np.bincount(bin_ids, weights=p, minlength=n_bins)
    sum_y = np.bincount(bin_ids, weights=y.astype(np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(counts > 0, sum_p / counts, np.nan)
        frac_y = np.where(counts > 0, sum_y / counts, np.nan)
    return counts, mean_p, frac_y


def _ece(y: np.ndarray, p: np.ndarray, n_bins: int = ECE_BINS) -> float:
    counts, mean_p, frac_y = _calibration_bins(y, p, n_bins)
    filled = counts > 0
    return float(np.sum(counts[filled] / y.size * np.abs(frac_y[filled] - mean_p[filled])))


def _point_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    c = _counts(y, p, threshold)
    return {
        "accuracy": (c.tp + c.tn) / c.n,
        "sensitivity": _ratio(c.tp, c.tp + c.fn),
        "specificity": _ratio(c.tn, c.tn + c.fp),
        "precision": _ratio(c.tp, c.tp + c.fp),
        "f1": _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn),
        "roc_auc": _roc_auc(y, p),
        "pr_auc": _average_precision(y, p),
        "brier": float(np.mean((p - y) ** 2)),
        "ece": _ece(y, p),
    }


def point_metrics(
    labels: Sequence[int] | np.ndarray,
    probabilities: Sequence[float] | np.ndarray,
    threshold: float,
) -> dict[str, float]:
    """The metric values without confidence intervals (cheap; used for threshold sweeps)."""
    y, p = _validate(labels, probabilities)
    return _point_metrics(y, p, float(threshold))


def compute_metrics(
    labels: Sequence[int] | np.ndarray,
    probabilities: Sequence[float] | np.ndarray,
    threshold: float,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, MetricValue]:
    """Every metric in :data:`METRIC_NAMES` with its 95 % stratified bootstrap interval.

    ``n_bootstrap=0`` skips the bootstrap; the intervals are then NaN.
    See the module docstring for definitions and the handling of undefined values.
    """
    if n_bootstrap < 0:
        raise MetricsError("n_bootstrap must be >= 0")
    if not math.isfinite(threshold):
        raise MetricsError("threshold must be a finite number")
    y, p = _validate(labels, probabilities)
    point = _point_metrics(y, p, float(threshold))

    samples = {name: np.full(n_bootstrap, np.nan) for name in METRIC_NAMES}
    if n_bootstrap:
        rng = np.random.default_rng(seed)
        pos_idx = np.flatnonzero(y == 1)
        neg_idx = np.flatnonzero(y == 0)
        for b in range(n_bootstrap):
            idx = np.concatenate(
                [
                    rng.choice(pos_idx, size=pos_idx.size, replace=True),
                    rng.choice(neg_idx, size=neg_idx.size, replace=True),
                ]
            )
            for name, value in _point_metrics(y[idx], p[idx], float(threshold)).items():
                samples[name][b] = value

    result: dict[str, MetricValue] = {}
    for name in METRIC_NAMES:
        finite = samples[name][np.isfinite(samples[name])]
        if finite.size:
            lo, hi = np.percentile(finite, [2.5, 97.5])
            ci = (float(lo), float(hi))
        else:
            ci = (math.nan, math.nan)
        result[name] = MetricValue(value=float(point[name]), ci95=ci)
    return result


def metrics_to_json(metrics: dict[str, MetricValue]) -> dict[str, dict[str, object]]:
    """The ``{"name": {"value": x, "ci95": [lo, hi]}}`` mapping for JSON output."""
    return {name: metrics[name].to_json() for name in METRIC_NAMES if name in metrics}
