"""Evaluation plots (matplotlib, no pyplot / no global backend state).

Each ``*_figure`` function returns a :class:`matplotlib.figure.Figure` built on
the Agg canvas, so it works headless in the CLI, in tests and in the notebook;
:func:`save_all_plots` writes the six PNGs ``pneumo evaluate --out`` promises.
The curves come from scikit-learn; the calibration bins are the ones
:mod:`model.metrics` uses for the ECE, so the diagram and the number agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from model.metrics import (
    ECE_BINS,
    calibration_bins,
    confusion_counts,
    point_metrics,
)

__all__ = [
    "PLOT_FILES",
    "confusion_figure",
    "pr_figure",
    "reliability_figure",
    "roc_figure",
    "save_all_plots",
    "score_histogram_figure",
    "threshold_sweep_figure",
]

#: File names written by :func:`save_all_plots`, in order.
PLOT_FILES = (
    "roc.png",
    "pr.png",
    "confusion_matrix.png",
    "reliability.png",
    "threshold_sweep.png",
    "score_histograms.png",
)

_NORMAL_COLOUR = "#1f77b4"
_PNEUMONIA_COLOUR = "#d62728"
_OPERATING_COLOUR = "#2ca02c"


def _figure(size: tuple[float, float] = (5.0, 4.5)) -> tuple[Figure, Axes]:
    fig = Figure(figsize=size, dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _arrays(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(labels, dtype=int), np.asarray(probabilities, dtype=float)


def roc_figure(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float, title: str = ""
) -> Figure:
    """ROC curve with the operating point (1 - specificity, sensitivity) at ``threshold``."""
    y, p = _arrays(labels, probabilities)
    fpr, tpr, _ = roc_curve(y, p)
    m = point_metrics(y, p, threshold)
    fig, ax = _figure()
    ax.plot(fpr, tpr, color=_PNEUMONIA_COLOUR, lw=2, label=f"ROC (AUC {m['roc_auc']:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.plot(
        [1 - m["specificity"]],
        [m["sensitivity"]],
        "o",
        ms=9,
        color=_OPERATING_COLOUR,
        label=f"operating point t={threshold:.3f}\n"
        f"sens {m['sensitivity']:.3f}, spec {m['specificity']:.3f}",
    )
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        xlabel="1 - specificity (false-positive rate)",
        ylabel="sensitivity (true-positive rate)",
        title=title or "ROC curve",
    )
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def pr_figure(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float, title: str = ""
) -> Figure:
    """Precision-recall curve with the operating point and the prevalence baseline."""
    y, p = _arrays(labels, probabilities)
    precision, recall, _ = precision_recall_curve(y, p)
    m = point_metrics(y, p, threshold)
    fig, ax = _figure()
    ax.step(
        recall,
        precision,
        where="post",
        color=_PNEUMONIA_COLOUR,
        lw=2,
        label=f"PR (AP {m['pr_auc']:.3f})",
    )
    ax.axhline(y.mean(), ls="--", color="grey", lw=1, label=f"prevalence {y.mean():.2f}")
    if not np.isnan(m["precision"]):
        ax.plot(
            [m["sensitivity"]],
            [m["precision"]],
            "o",
            ms=9,
            color=_OPERATING_COLOUR,
            label=f"operating point t={threshold:.3f}",
        )
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        xlabel="recall (sensitivity)",
        ylabel="precision",
        title=title or "Precision-recall curve",
    )
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def confusion_figure(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float, title: str = ""
) -> Figure:
    """2x2 confusion matrix (rows: truth, columns: prediction) with counts and row %."""
    y, p = _arrays(labels, probabilities)
    c = confusion_counts(y, p, threshold)
    matrix = np.array([[c.tn, c.fp], [c.fn, c.tp]])
    row_sums = matrix.sum(axis=1, keepdims=True)
    fractions = np.divide(
        matrix, row_sums, out=np.zeros_like(matrix, dtype=float), where=row_sums > 0
    )
    fig, ax = _figure((4.6, 4.2))
    ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    names = ["NORMAL", "PNEUMONIA"]
    for i in range(2):
        for j in range(2):
            ax.text(
                j,
                i,
                f"{matrix[i, j]}\n{fractions[i, j]:.1%}",
                ha="center",
                va="center",
                fontsize=12,
                color="white" if fractions[i, j] > 0.5 else "black",
            )
    ax.set_xticks([0, 1], labels=names)
    ax.set_yticks([0, 1], labels=names)
    ax.set(
        xlabel="predicted", ylabel="true", title=title or f"Confusion matrix at t={threshold:.3f}"
    )
    return fig


def reliability_figure(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5, title: str = ""
) -> Figure:
    """Reliability diagram: observed pneumonia fraction vs mean predicted probability per bin,
    with the per-bin counts underneath. The bins are the ECE's."""
    y, p = _arrays(labels, probabilities)
    counts, mean_p, frac_y = calibration_bins(y, p)
    ece = point_metrics(y, p, threshold)["ece"]
    edges = np.linspace(0, 1, ECE_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = Figure(figsize=(5.0, 5.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax_counts = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    filled = counts > 0
    ax.bar(
        centres[filled],
        frac_y[filled],
        width=1 / ECE_BINS,
        edgecolor="black",
        color=_NORMAL_COLOUR,
        alpha=0.7,
        label="observed fraction",
    )
    ax.plot(
        mean_p[filled],
        frac_y[filled],
        "o-",
        color=_PNEUMONIA_COLOUR,
        ms=4,
        label="mean predicted vs observed",
    )
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        ylabel="fraction with pneumonia",
        title=title or f"Reliability diagram (ECE {ece:.3f}, {ECE_BINS} bins)",
    )
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax_counts.bar(centres, counts, width=1 / ECE_BINS, color="grey", edgecolor="black")
    ax_counts.set_yscale("symlog")
    ax_counts.set(xlabel="predicted probability of pneumonia", ylabel="images")
    return fig


def threshold_sweep_figure(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float, title: str = ""
) -> Figure:
    """Sensitivity and specificity as functions of the threshold, operating threshold marked."""
    y, p = _arrays(labels, probabilities)
    grid = np.unique(np.concatenate([np.linspace(0, 1, 201), p]))
    pos = np.sort(p[y == 1])
    neg = np.sort(p[y == 0])
    # sensitivity(t) = share of positives with p >= t; specificity(t) = share of negatives < t
    sens = 1 - np.searchsorted(pos, grid, side="left") / max(pos.size, 1)
    spec = np.searchsorted(neg, grid, side="left") / max(neg.size, 1)
    fig, ax = _figure((5.5, 4.2))
    if pos.size:
        ax.plot(grid, sens, color=_PNEUMONIA_COLOUR, lw=2, label="sensitivity")
    if neg.size:
        ax.plot(grid, spec, color=_NORMAL_COLOUR, lw=2, label="specificity")
    ax.axvline(threshold, color=_OPERATING_COLOUR, ls="--", label=f"operating t={threshold:.3f}")
    ax.set(
        xlim=(0, 1),
        ylim=(-0.01, 1.01),
        xlabel="threshold on calibrated probability",
        ylabel="rate",
        title=title or "Sensitivity / specificity vs threshold",
    )
    ax.legend(loc="lower center", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def score_histogram_figure(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float, title: str = ""
) -> Figure:
    """Histograms of the predicted probability, one per true class."""
    y, p = _arrays(labels, probabilities)
    bins = np.linspace(0, 1, 41)
    fig, ax = _figure((5.5, 4.2))
    for value, name, colour in ((0, "NORMAL", _NORMAL_COLOUR), (1, "PNEUMONIA", _PNEUMONIA_COLOUR)):
        scores = p[y == value]
        if scores.size:
            ax.hist(
                scores,
                bins=bins.tolist(),
                alpha=0.55,
                color=colour,
                edgecolor="black",
                lw=0.5,
                label=f"{name} (n={scores.size})",
            )
    ax.axvline(threshold, color=_OPERATING_COLOUR, ls="--", label=f"operating t={threshold:.3f}")
    ax.set_yscale("symlog")
    ax.set(
        xlim=(0, 1),
        xlabel="predicted probability of pneumonia",
        ylabel="images",
        title=title or "Score distribution per class",
    )
    ax.legend(loc="upper center", fontsize=8)
    return fig


def save_all_plots(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float, out_dir: Path, title: str = ""
) -> list[Path]:
    """Write the six PNGs of :data:`PLOT_FILES` into ``out_dir``.

    Curves that need both classes (ROC, PR) are skipped when one class is
    missing; the others are always written.
    """
    y, p = _arrays(labels, probabilities)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    both = 0 < int(y.sum()) < y.size
    builders = {
        "roc.png": roc_figure if both else None,
        "pr.png": pr_figure if both else None,
        "confusion_matrix.png": confusion_figure,
        "reliability.png": reliability_figure,
        "threshold_sweep.png": threshold_sweep_figure,
        "score_histograms.png": score_histogram_figure,
    }
    written = []
    for name in PLOT_FILES:
        build = builders[name]
        if build is None:
            continue
        fig = build(y, p, threshold)
        if title:
            fig.suptitle(title, fontsize=9)
        path = out_dir / name
        fig.savefig(path)
        written.append(path)
    return written
