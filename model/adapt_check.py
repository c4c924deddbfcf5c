"""The honest test of label-free site adaptation: adapt on one half, score the other.

Issue 12's protocol on a labelled set from the new site (``kermany/test``):
split it in two halves by patient (:func:`patient_halves`); re-normalise the
model (:func:`model.adapt.adapt_weights`) on half A's images *without their
labels*, evaluate the adapted and the plain model on half B; swap. The
adapted model never sees the images it is scored on, and no label is read
before scoring. :func:`split_half_adaptation` returns both halves side by side
as an :class:`AdaptationCheck`, which the model card prints in a section of
its own (apart from the targets: the shipped model is the plain one).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.adapt import adapt_weights
from model.evaluation import evaluate
from model.evaluation_sets import LabelledDataset
from model.inference import load_predictor
from model.training_data import patient_of

__all__ = [
    "REPORTED_METRICS",
    "AdaptationCheck",
    "HalfResult",
    "patient_halves",
    "split_half_adaptation",
]

REPORTED_METRICS = ("roc_auc", "sensitivity", "specificity", "accuracy", "ece")
"""What each half reports, plain and adapted."""


@dataclass(frozen=True)
class HalfResult:
    """One direction of the protocol: adapted on ``adapted_on``, scored on ``scored_on``."""

    adapted_on: str
    scored_on: str
    n_adapt_images: int
    n_scored: int
    plain: dict[str, float | None]
    adapted: dict[str, float | None]
    prior_site: float | None
    """The EM estimate of the pneumonia share on the adapting half (None: prior not adapted)."""


@dataclass(frozen=True)
class AdaptationCheck:
    """Both directions, and the protocol that produced them."""

    dataset: str
    source_version: str
    prior: bool
    halves: tuple[HalfResult, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "source_version": self.source_version,
            "prior": self.prior,
            "protocol": "split by patient into halves A and B; adapt on one half's images "
            "without labels, evaluate plain and adapted on the other; swap",
            "halves": [asdict(h) for h in self.halves],
        }

    def write_json(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n")
        return path


def _half_of(patient: str, seed: int) -> int:
    digest = hashlib.sha256(f"{seed}:{patient}".encode()).digest()
    return digest[0] & 1


def patient_halves(dataset: LabelledDataset, seed: int = 0) -> tuple[LabelledDataset, ...]:
    """(A, B): every patient's images in exactly one half (hash of the patient key).

    The patient key is :func:`model.training_data.patient_of` of the file name,
    prefixed with the class folder as in training; the split ignores labels
    otherwise, so the halves' class balance is only approximately equal.
    """
    sides: tuple[list[int], list[int]] = ([], [])
    for i, item in enumerate(dataset.items):
        key = f"{item.label}:{patient_of(Path(item.ref).name)}"
        sides[_half_of(key, seed)].append(i)
    return dataset.subset(sides[0]), dataset.subset(sides[1])


def _metrics(result_json: dict[str, Any]) -> dict[str, float | None]:
    """The reported metrics' point values from an evaluation's JSON (None: undefined)."""
    out: dict[str, float | None] = {}
    for name in REPORTED_METRICS:
        entry = result_json.get(name)
        value = entry.get("value") if isinstance(entry, dict) else entry
        out[name] = None if value is None else float(value)
    return out


def _images(dataset: LabelledDataset) -> list[np.ndarray]:
    """The half's pixels only: the adapting code gets images, never labels."""
    images = []
    for item in dataset.items:
        try:
            images.append(dataset.load(item))
        except Exception:  # an undecodable file is left out of the statistics, as in serving
            continue
    return images


def split_half_adaptation(
    weights: Path,
    dataset: LabelledDataset,
    work_dir: Path,
    *,
    prior: bool = False,
    seed: int = 0,
    n_bootstrap: int = 0,
    progress: Callable[[str], None] | None = None,
) -> AdaptationCheck:
    """Run the protocol on ``dataset``; the adapted files are written under ``work_dir``.

    Raises:
        ValueError: a half has fewer than 16 images (:func:`model.adapt.adapt_weights`).
    """
    weights = Path(weights)
    plain = load_predictor(weights)
    halves = patient_halves(dataset, seed)
    names = ("A", "B")
    results: list[HalfResult] = []
    plain_metrics: dict[int, dict[str, float | None]] = {}
    for adapt_on, score_on in ((0, 1), (1, 0)):
        if progress:
            progress(f"adapting on half {names[adapt_on]}")
        out = Path(work_dir) / f"adapted-on-{names[adapt_on]}.pt"
        version = f"{plain.info.version}+adabn-{names[adapt_on]}"
        adapted = adapt_weights(weights, _images(halves[adapt_on]), out, version, adapt_prior=prior)
        if score_on not in plain_metrics:
            scored = evaluate(plain, halves[score_on], n_bootstrap=n_bootstrap, seed=seed)
            plain_metrics[score_on] = _metrics(scored.to_json())
        if progress:
            progress(f"scoring half {names[score_on]}")
        adapted_result = evaluate(
            load_predictor(out), halves[score_on], n_bootstrap=n_bootstrap, seed=seed
        )
        results.append(
            HalfResult(
                adapted_on=names[adapt_on],
                scored_on=names[score_on],
                n_adapt_images=adapted.n_images,
                n_scored=adapted_result.n,
                plain=plain_metrics[score_on],
                adapted=_metrics(adapted_result.to_json()),
                prior_site=adapted.prior_site,
            )
        )
    return AdaptationCheck(dataset.name, plain.info.version, prior, tuple(results))
