"""model.metrics against scikit-learn and against hand-worked edge cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from model.metrics import (
    ECE_BINS,
    METRIC_NAMES,
    MetricsError,
    calibration_bins,
    compute_metrics,
    confusion_counts,
    metrics_to_json,
    point_metrics,
)


def _scores(seed: int, n: int = 300, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.6).astype(int)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0.0, 1.0)
    if ties:  # coarse scores make many ties, the hard case for AUC / AP
        p = np.round(p, 1)
    return y, p


def _sklearn_ece(y: np.ndarray, p: np.ndarray) -> float:
    """ECE rebuilt from scikit-learn's reliability curve and the documented binning."""
    prob_true, prob_pred = calibration_curve(y, p, n_bins=ECE_BINS, strategy="uniform")
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    ids = np.searchsorted(edges[1:-1], p)
    counts = np.bincount(ids, minlength=ECE_BINS)
    counts = counts[counts > 0]  # calibration_curve drops empty bins too
    return float(np.sum(counts / y.size * np.abs(prob_true - prob_pred)))


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, False), (3, True)])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.62])
def test_point_values_equal_scikit_learn(seed: int, ties: bool, threshold: float) -> None:
    y, p = _scores(seed, ties=ties)
    pred = (p >= threshold).astype(int)
    got = compute_metrics(y, p, threshold, n_bootstrap=0)
    expected = {
        "accuracy": accuracy_score(y, pred),
        "sensitivity": recall_score(y, pred),
        "specificity": recall_score(y, pred, pos_label=0),
        "precision": precision_score(y, pred),
        "f1": f1_score(y, pred),
        "roc_auc": roc_auc_score(y, p),
        "pr_auc": average_precision_score(y, p),
        "brier": brier_score_loss(y, p),
        "ece": _sklearn_ece(y, p),
    }
    assert set(got) == set(METRIC_NAMES)
    for name, value in expected.items():
        assert got[name].value == pytest.approx(value, abs=1e-12), name


def test_bootstrap_intervals_are_seeded_and_bracket_the_estimate() -> None:
    y, p = _scores(5, n=200)
    a = compute_metrics(y, p, 0.5, n_bootstrap=300, seed=7)
    b = compute_metrics(y, p, 0.5, n_bootstrap=300, seed=7)
    c = compute_metrics(y, p, 0.5, n_bootstrap=300, seed=8)
    assert a == b
    assert a != c
    for name in METRIC_NAMES:
        lo, hi = a[name].ci95
        assert lo <= hi, name
        # The percentile interval of a smooth statistic contains its point estimate.
        assert lo - 1e-9 <= a[name].value <= hi + 1e-9, name
    # A 95 % interval of AUC on 200 samples is neither degenerate nor absurdly wide.
    width = a["roc_auc"].ci95[1] - a["roc_auc"].ci95[0]
    assert 0.01 < width < 0.3


def test_bootstrap_interval_shrinks_with_more_data() -> None:
    small = compute_metrics(*_scores(9, n=100), 0.5, n_bootstrap=300)
    large = compute_metrics(*_scores(9, n=2000), 0.5, n_bootstrap=300)
    for name in ("accuracy", "roc_auc", "brier"):
        w_small = small[name].ci95[1] - small[name].ci95[0]
        w_large = large[name].ci95[1] - large[name].ci95[0]
        assert w_large < w_small, name


def test_perfect_separation() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.0, 0.1, 0.2, 0.8, 0.9, 1.0])
    m = compute_metrics(y, p, 0.5, n_bootstrap=50)
    for name in ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "pr_auc"):
        assert m[name].value == 1.0, name
        assert m[name].ci95 == (1.0, 1.0), name
    assert m["brier"].value == pytest.approx(np.mean((p - y) ** 2))


def test_threshold_edges() -> None:
    y, p = _scores(4, n=50)
    # A score equal to the threshold counts as positive (Prediction.finding uses >=).
    at = confusion_counts(np.array([0, 1]), np.array([0.4, 0.4]), 0.4)
    assert (at.tp, at.fp, at.tn, at.fn) == (1, 1, 0, 0)
    everything = point_metrics(y, p, 0.0)
    assert everything["sensitivity"] == 1.0 and everything["specificity"] == 0.0
    assert everything["precision"] == pytest.approx(y.mean())
    nothing = point_metrics(y, p, 1.01)
    assert nothing["sensitivity"] == 0.0 and nothing["specificity"] == 1.0
    assert math.isnan(nothing["precision"])  # no predicted positive: undefined, not 0
    assert nothing["f1"] == 0.0  # there are positives, all missed
    # Threshold-free metrics do not move with the threshold.
    for name in ("roc_auc", "pr_auc", "brier", "ece"):
        assert everything[name] == nothing[name]


def test_single_class_gives_nan_for_undefined_metrics() -> None:
    p = np.array([0.1, 0.2, 0.7, 0.3])
    normals = compute_metrics(np.zeros(4, dtype=int), p, 0.5, n_bootstrap=20)
    assert normals["specificity"].value == 0.75
    assert normals["accuracy"].value == 0.75
    for name in ("sensitivity", "roc_auc", "pr_auc"):
        assert math.isnan(normals[name].value), name
        assert all(math.isnan(v) for v in normals[name].ci95), name
    positives = compute_metrics(np.ones(4, dtype=int), p, 0.5, n_bootstrap=20)
    assert positives["sensitivity"].value == 0.25
    assert math.isnan(positives["specificity"].value)
    assert math.isnan(positives["roc_auc"].value)
    # NaN must survive JSON as null, not as the invalid token NaN.
    text = json.dumps(metrics_to_json(normals), allow_nan=False)
    assert json.loads(text)["roc_auc"] == {"value": None, "ci95": [None, None]}


def test_calibration_bins_match_ece() -> None:
    y, p = _scores(6)
    counts, mean_p, frac_y = calibration_bins(y, p)
    assert counts.sum() == y.size and counts.size == ECE_BINS
    filled = counts > 0
    ece = np.sum(counts[filled] / y.size * np.abs(frac_y[filled] - mean_p[filled]))
    assert point_metrics(y, p, 0.5)["ece"] == pytest.approx(ece)
    # A perfectly calibrated constant predictor has zero ECE.
    y_const = np.array([1, 0, 0, 0] * 10)
    assert point_metrics(y_const, np.full(40, 0.25), 0.5)["ece"] == pytest.approx(0.0)


@pytest.mark.parametrize(
    "labels,probs,message",
    [
        ([], [], "no samples"),
        ([0, 1], [0.5], "labels but"),
        ([0, 2], [0.1, 0.2], "labels must be"),
        ([0, 1], [0.1, 1.5], "within"),
        ([0, 1], [0.1, float("nan")], "finite"),
    ],
)
def test_bad_input_is_a_clear_error(labels: list, probs: list, message: str) -> None:
    with pytest.raises(MetricsError, match=message):
        compute_metrics(labels, probs, 0.5, n_bootstrap=0)
