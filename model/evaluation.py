"""Run a predictor over a labelled dataset and report metrics, predictions and plots.

The engine behind ``pneumo evaluate``, the model card's test figures and the
notebook. Items the model cannot score are *not processed* -- listed with a
reason in ``predictions.csv`` and counted, but kept out of the metrics:

* unreadable files (a broken JPEG, a DICOM ``dicom_io`` cannot decode),
* images the model's input checks reject (e.g. smaller than the network accepts),
* images the out-of-distribution guard flags as not a chest radiograph.
"""

from __future__ import annotations

import csv
import enum
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from model.evaluation_sets import LabelledDataset, LabelledItem
from model.inference import NOT_CHEST_CODE
from model.metrics import (
    METRIC_NAMES,
    ConfusionCounts,
    MetricsError,
    MetricValue,
    compute_metrics,
    confusion_counts,
    metrics_to_json,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "PREDICTION_COLUMNS",
    "EvaluationResult",
    "NotProcessed",
    "PredictionRecord",
    "PredictorLike",
    "evaluate",
    "format_table",
    "predict_dataset",
    "read_predictions_csv",
    "result_from_records",
    "write_outputs",
    "write_predictions_csv",
]

log = logging.getLogger(__name__)

#: How many images are decoded and handed to the predictor at once.
DEFAULT_BATCH_SIZE = 32


class NotProcessed(str, enum.Enum):
    """Why an item has no probability (the value is what ``predictions.csv`` records)."""

    UNREADABLE = "unreadable"
    """The file could not be decoded (broken JPEG, a DICOM ``dicom_io`` cannot read)."""
    REJECTED = "rejected by the model's input checks"
    """Decoded, but the preprocessing refused it (e.g. smaller than the network accepts)."""
    NOT_CHEST = NOT_CHEST_CODE
    """The out-of-distribution guard judged it not a chest radiograph (the worker's code)."""

    @property
    def description(self) -> str:
        """Prose for people (tables, cards); the value stays the machine code."""
        return "not a chest radiograph" if self is NotProcessed.NOT_CHEST else self.value


class _PredictionLike(Protocol):
    # read-only: ``model.inference.Prediction`` is a frozen dataclass
    @property
    def probability(self) -> float: ...
    @property
    def ood_score(self) -> float: ...
    @property
    def is_chest(self) -> bool: ...


class PredictorLike(Protocol):
    """What evaluation needs of ``model.inference.Predictor``: ``predict`` and an
    ``info`` with ``name``, ``version``, ``sha256`` and ``threshold``."""

    info: Any

    def predict(self, images: Sequence[np.ndarray]) -> Sequence[_PredictionLike]: ...


@dataclass(frozen=True)
class PredictionRecord:
    """One row of ``predictions.csv``."""

    ref: str
    label: int
    probability: float | None
    ood_score: float | None
    not_processed: NotProcessed | None = None
    detail: str = ""  # short reason text for not-processed items (no PHI: no header values)

    @property
    def scored(self) -> bool:
        return self.not_processed is None

    @property
    def reason(self) -> str:
        if self.not_processed is None:
            return ""
        return (
            f"{self.not_processed.value}: {self.detail}"
            if self.detail
            else self.not_processed.value
        )


@dataclass(frozen=True)
class EvaluationResult:
    """Everything ``pneumo evaluate`` prints and writes."""

    dataset: str
    model_name: str
    model_version: str
    model_sha256: str
    threshold: float
    records: tuple[PredictionRecord, ...]
    metrics: dict[str, MetricValue] | None  # None when nothing could be scored
    n_bootstrap: int
    seed: int
    metrics_error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def scored(self) -> list[PredictionRecord]:
        return [r for r in self.records if r.scored]

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.scored], dtype=np.int8)

    @property
    def probabilities(self) -> np.ndarray:
        return np.array([r.probability for r in self.scored], dtype=np.float64)

    @property
    def n(self) -> int:
        """Number of items the metrics are computed on."""
        return len(self.scored)

    def not_processed_counts(self) -> dict[str, int]:
        counts = Counter(r.not_processed.value for r in self.records if r.not_processed)
        return {reason.value: counts.get(reason.value, 0) for reason in NotProcessed}

    def confusion(self) -> ConfusionCounts | None:
        if not self.n:
            return None
        return confusion_counts(self.labels, self.probabilities, self.threshold)

    def to_json(self) -> dict[str, Any]:
        """The ``metrics.json`` / ``--format json`` object.

        Metric keys map to ``{"value": x, "ci95": [lo, hi]}`` (``null`` when
        undefined or nothing could be scored); then ``n``, ``threshold``,
        ``model_version`` and supporting detail.
        """
        out: dict[str, Any] = {}
        if self.metrics is not None:
            out.update(metrics_to_json(self.metrics))
        else:
            out.update({name: {"value": None, "ci95": [None, None]} for name in METRIC_NAMES})
        labels = self.labels
        confusion = self.confusion()
        out.update(
            {
                "n": self.n,
                "threshold": self.threshold,
                "model_version": self.model_version,
                "model_name": self.model_name,
                "model_sha256": self.model_sha256,
                "dataset": self.dataset,
                "n_total": len(self.records),
                "n_positive": int(np.count_nonzero(labels == 1)),
                "n_negative": int(np.count_nonzero(labels == 0)),
                "n_not_processed": len(self.records) - self.n,
                "not_processed": self.not_processed_counts(),
                "confusion": None
                if confusion is None
                else {
                    "tp": confusion.tp,
                    "fp": confusion.fp,
                    "tn": confusion.tn,
                    "fn": confusion.fn,
                },
                "bootstrap": {
                    "method": "stratified percentile",
                    "n": self.n_bootstrap,
                    "seed": self.seed,
                },
            }
        )
        if self.metrics_error:
            out["metrics_error"] = self.metrics_error
        out.update(self.extra)
        return out


def _info_value(info: Any, name: str, default: Any) -> Any:
    return getattr(info, name, default) if info is not None else default


def _short(exc: BaseException) -> str:
    """A one-line reason for a failure. Exception texts from our decoders name no
    patient data; the length cap keeps a stray long message out of the CSV."""
    kind = getattr(exc, "kind", None)  # dicom_io.pixels.PixelReadError carries a .kind
    label = getattr(kind, "value", kind) if kind is not None else type(exc).__name__
    text = " ".join(str(exc).split())
    if text.startswith(str(label)):  # PixelReadError's text already starts with its kind
        return text[:200]
    return f"{label}: {text}"[:200] if text else str(label)


def predict_dataset(
    predictor: PredictorLike,
    dataset: LabelledDataset,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[int], object] | None = None,
) -> list[PredictionRecord]:
    """Score every item; never raises for a single bad item.

    Items are decoded and predicted in batches. If a batch fails inside the
    predictor (one image the model rejects), its images are retried one by one
    so only the offender is marked not processed.
    """
    records: list[PredictionRecord] = []
    items = list(dataset)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        loaded: list[tuple[LabelledItem, np.ndarray]] = []
        for item in chunk:
            try:
                loaded.append((item, dataset.load(item)))
            except Exception as exc:  # any decoder failure is this item's, not the run's
                log.debug("not processed (unreadable): %s", item.ref)
                records.append(
                    PredictionRecord(
                        item.ref, item.label, None, None, NotProcessed.UNREADABLE, _short(exc)
                    )
                )
        records.extend(_predict_loaded(predictor, loaded))
        if progress is not None:
            progress(len(chunk))
    order = {item.ref: i for i, item in enumerate(items)}
    records.sort(key=lambda r: order[r.ref])
    return records


def _predict_loaded(
    predictor: PredictorLike, loaded: list[tuple[LabelledItem, np.ndarray]]
) -> list[PredictionRecord]:
    if not loaded:
        return []
    try:
        preds = list(predictor.predict([img for _, img in loaded]))
        if len(preds) != len(loaded):
            raise RuntimeError(f"predictor returned {len(preds)} results for {len(loaded)} images")
    except Exception as exc:
        if len(loaded) == 1:
            item = loaded[0][0]
            log.debug("not processed (rejected): %s", item.ref)
            return [
                PredictionRecord(
                    item.ref, item.label, None, None, NotProcessed.REJECTED, _short(exc)
                )
            ]
        out: list[PredictionRecord] = []
        for pair in loaded:  # isolate the image that broke the batch
            out.extend(_predict_loaded(predictor, [pair]))
        return out
    out = []
    for (item, _), pred in zip(loaded, preds, strict=True):
        prob = float(pred.probability)
        ood = float(pred.ood_score)
        if not pred.is_chest:
            out.append(
                PredictionRecord(
                    item.ref,
                    item.label,
                    prob,
                    ood,
                    NotProcessed.NOT_CHEST,
                    "out-of-distribution score above the guard's threshold",
                )
            )
        else:
            out.append(PredictionRecord(item.ref, item.label, prob, ood))
    return out


def evaluate(
    predictor: PredictorLike,
    dataset: LabelledDataset,
    *,
    threshold: float | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[int], object] | None = None,
) -> EvaluationResult:
    """Predict the dataset and compute the metrics at the model's operating threshold.

    ``threshold`` overrides the shipped one (for analysis only; the model card
    always uses the shipped threshold).
    """
    records = predict_dataset(predictor, dataset, batch_size=batch_size, progress=progress)
    return result_from_records(
        predictor.info,
        dataset.name,
        records,
        threshold=threshold,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )


def result_from_records(
    info: Any,
    dataset_name: str,
    records: Sequence[PredictionRecord],
    *,
    threshold: float | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> EvaluationResult:
    """Metrics over the scored records (the not-processed ones are only counted)."""
    thr = float(threshold if threshold is not None else _info_value(info, "threshold", 0.5))
    scored = [r for r in records if r.scored]
    metrics: dict[str, MetricValue] | None = None
    error = ""
    if scored:
        try:
            metrics = compute_metrics(
                [r.label for r in scored],
                [float(r.probability or 0.0) for r in scored],  # scored: never None
                thr,
                n_bootstrap=n_bootstrap,
                seed=seed,
            )
        except MetricsError as exc:
            error = str(exc)
    else:
        error = "no image could be scored"
    return EvaluationResult(
        dataset=dataset_name,
        model_name=str(_info_value(info, "name", "unknown")),
        model_version=str(_info_value(info, "version", "unknown")),
        model_sha256=str(_info_value(info, "sha256", "")),
        threshold=thr,
        records=tuple(records),
        metrics=metrics,
        n_bootstrap=n_bootstrap,
        seed=seed,
        metrics_error=error,
    )


# --- output ----------------------------------------------------------------

PREDICTION_COLUMNS = ("path", "label", "probability", "ood_score", "not_processed")


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def write_predictions_csv(result: EvaluationResult, path: Path) -> Path:
    """``path,label,probability,ood_score,not_processed`` -- one row per item, in dataset order.

    ``probability`` and ``ood_score`` are kept for not-a-chest rows (for
    auditing the guard) but those rows are not in the metrics.
    """
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(PREDICTION_COLUMNS)
        for r in result.records:
            writer.writerow([r.ref, r.label, _fmt(r.probability), _fmt(r.ood_score), r.reason])
    return path


def read_predictions_csv(path: Path) -> list[PredictionRecord]:
    """Inverse of :func:`write_predictions_csv` (the notebook and tests use it)."""
    by_value = {reason.value: reason for reason in NotProcessed}
    records = []
    with Path(path).open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            reason_text = row["not_processed"]
            reason = None
            detail = ""
            if reason_text:
                head, _, detail = reason_text.partition(": ")
                reason = by_value[head]
            records.append(
                PredictionRecord(
                    ref=row["path"],
                    label=int(row["label"]),
                    probability=float(row["probability"]) if row["probability"] else None,
                    ood_score=float(row["ood_score"]) if row["ood_score"] else None,
                    not_processed=reason,
                    detail=detail,
                )
            )
    return records


def write_outputs(result: EvaluationResult, out_dir: Path, *, plots: bool = True) -> list[Path]:
    """``metrics.json``, ``predictions.csv`` and (if anything was scored) the PNG plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(
        json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    written = [metrics_path, write_predictions_csv(result, out_dir / "predictions.csv")]
    if plots and result.n:
        from model.plots import save_all_plots  # matplotlib only when plots are wanted

        written += save_all_plots(
            result.labels,
            result.probabilities,
            result.threshold,
            out_dir,
            title=f"{result.dataset} - {result.model_name} {result.model_version}",
        )
    return written


def format_table(result: EvaluationResult) -> str:
    """A human-readable summary: one metric per line with its 95 % CI."""
    lines = [
        f"model     {result.model_name} {result.model_version} (sha256 {result.model_sha256[:12]})",
        f"dataset   {result.dataset}",
        f"threshold {result.threshold:.4f}",
    ]
    labels = result.labels
    lines.append(
        f"scored    {result.n} of {len(result.records)} "
        f"({int(np.count_nonzero(labels == 0))} normal, "
        f"{int(np.count_nonzero(labels == 1))} pneumonia)"
    )
    skipped = {k: v for k, v in result.not_processed_counts().items() if v}
    if skipped:
        lines.append(
            "not processed "
            + ", ".join(f"{v} {NotProcessed(k).description}" for k, v in skipped.items())
        )
    confusion = result.confusion()
    if confusion is not None:
        lines.append(
            f"confusion TP {confusion.tp}  FP {confusion.fp}  TN {confusion.tn}  FN {confusion.fn}"
        )
    lines.append("")
    if result.metrics is None:
        lines.append(f"no metrics: {result.metrics_error}")
        return "\n".join(lines)
    lines.append(f"{'metric':<12} {'value':>8}   95% CI")
    for name in METRIC_NAMES:
        m = result.metrics[name]
        if math.isnan(m.value):
            lines.append(f"{name:<12} {'n/a':>8}   (undefined on this set)")
            continue
        lo, hi = m.ci95
        ci = "" if math.isnan(lo) else f"[{lo:.4f}, {hi:.4f}]"
        lines.append(f"{name:<12} {m.value:>8.4f}   {ci}")
    return "\n".join(lines)
