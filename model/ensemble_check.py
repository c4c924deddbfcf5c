"""What a logit-averaged ensemble of trained candidates buys, measured on validation only.

Issue 12 lists an ensemble of 3-5 members averaged in logit space as a lever.
:func:`ensemble_check` scores each member and their ensemble on the plain and
the perturbed validation views of the members' common patient split (the
views training itself uses: :func:`model.training_data.patient_split`,
:func:`model.shift.perturbed_view`), with the shipped recipe's operating rule
for each: Platt scaling fitted on both views, then the highest threshold with
perturbed-validation sensitivity >= the target. kermany/test is never read:
whether a candidate goes on to the test set is decided from these figures.

Members must have been trained on the same split (same seed and validation
fraction); a member recording another one is refused, since its "validation"
images would be training images of the others.

Serving cost is the sum of the members' forward passes, so a k-member
ensemble predicts at about 1/k of a member's images/s (``bench/inference.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.calibration import apply_temperature, fit_platt, threshold_for_sensitivity
from model.inference import pick_device, read_weights_file
from model.metrics import roc_auc
from model.network import NetConfig, build_network
from model.shift import perturbed_view
from model.train import network_outputs
from model.training_data import list_samples, load_pixels, patient_split

__all__ = ["EnsembleCheck", "ViewScores", "ensemble_check", "format_check"]


@dataclass(frozen=True)
class ViewScores:
    """One candidate (a member or the ensemble) on the two validation views."""

    candidate: str
    val_auc: float
    perturbed_auc: float
    perturbed_sensitivity: float
    perturbed_specificity: float
    val_specificity: float
    threshold: float


@dataclass(frozen=True)
class EnsembleCheck:
    """Every member, then the ensemble, on ``n_val`` validation images."""

    members: tuple[str, ...]
    n_val: int
    n_val_pneumonia: int
    split: dict[str, Any]
    rows: tuple[ViewScores, ...]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows": [asdict(r) for r in self.rows]}


def _split_of(payload: dict[str, Any]) -> dict[str, Any]:
    config = payload.get("training", {}).get("config", {})
    return {
        "seed": int(config.get("seed", 0)),
        "val_fraction": float(config.get("val_fraction", 0.15)),
        "input_size": int(payload.get("input_size", 224)),
    }


def _member_logits(payload: dict[str, Any], views: Sequence[np.ndarray]) -> list[np.ndarray]:
    config = NetConfig.from_dict(payload["net_config"])
    net = build_network(config)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v
                         for k, v in payload["state_dict"].items()})  # fmt: skip
    device = pick_device(None)
    net.eval().to(device)
    channels_last = config.arch != "pneumonet"
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    mirror = str(payload.get("tta", "hflip-mean-logit")) != "none"
    equalize = bool(payload.get("equalize", False))
    return [
        network_outputs(
            net, view, device, mirror=mirror, channels_last=channels_last, equalize=equalize
        )[0]
        for view in views
    ]


def _scores(name: str, plain: np.ndarray, shifted: np.ndarray, labels: np.ndarray,
            target: float) -> ViewScores:  # fmt: skip
    temperature, bias = fit_platt(np.concatenate([plain, shifted]), np.concatenate([labels] * 2))
    p_plain = apply_temperature(plain, temperature, bias)
    p_shift = apply_temperature(shifted, temperature, bias)
    threshold = threshold_for_sensitivity(p_shift, labels, target)
    y = labels.astype(bool)

    def rates(p: np.ndarray) -> tuple[float, float]:
        pred = p >= threshold
        return float((pred & y).sum() / max(y.sum(), 1)), float(
            (~pred & ~y).sum() / max((~y).sum(), 1)
        )

    sens_shift, spec_shift = rates(p_shift)
    _, spec_plain = rates(p_plain)
    return ViewScores(
        candidate=name,
        val_auc=roc_auc(labels, p_plain),
        perturbed_auc=roc_auc(labels, p_shift),
        perturbed_sensitivity=sens_shift,
        perturbed_specificity=spec_shift,
        val_specificity=spec_plain,
        threshold=threshold,
    )


def ensemble_check(
    weights: Sequence[Path],
    data: Path,
    *,
    cache_dir: Path | None = None,
    target_sensitivity: float = 0.95,
    limit: int = 0,
) -> EnsembleCheck:
    """Score each member of ``weights`` and their logit mean on the validation views.

    ``data`` is the training folder (``NORMAL/``, ``PNEUMONIA/``) the members
    were trained on; ``limit`` > 0 keeps that many validation images per class
    (tests). Never reads kermany/test.

    Raises:
        ValueError: fewer than two members, or members trained on different splits.
        FileNotFoundError: a weights file or the data folder is missing.
    """
    if len(weights) < 2:
        raise ValueError("an ensemble needs at least two members")
    payloads = [read_weights_file(w) for w in weights]
    splits = [_split_of(p) for p in payloads]
    if any(s != splits[0] for s in splits[1:]):
        raise ValueError(f"members were trained on different splits: {splits}")
    split = splits[0]
    _, val = patient_split(list_samples(Path(data)), split["val_fraction"], split["seed"])
    if limit > 0:
        val = [s for s in val if s.label == 0][:limit] + [s for s in val if s.label == 1][:limit]
    labels = np.array([s.label for s in val], dtype=np.int64)
    pixels = load_pixels(val, split["input_size"], cache_dir=cache_dir)
    views = [pixels, perturbed_view(pixels, split["seed"])]
    names = [f"{p['name']}-{p['version']}" for p in payloads]
    logits = [_member_logits(p, views) for p in payloads]
    rows = [
        _scores(name, plain, shifted, labels, target_sensitivity)
        for name, (plain, shifted) in zip(names, logits, strict=True)
    ]
    mean = [np.mean([member[v] for member in logits], axis=0) for v in range(2)]
    rows.append(_scores("ensemble(" + " + ".join(names) + ")", mean[0], mean[1], labels,
                        target_sensitivity))  # fmt: skip
    return EnsembleCheck(
        members=tuple(names),
        n_val=len(val),
        n_val_pneumonia=int(labels.sum()),
        split=split,
        rows=tuple(rows),
    )


def format_check(check: EnsembleCheck) -> str:
    """The check as a Markdown table (the model card's experiment-table columns)."""
    lines = [
        f"validation: {check.n_val} images ({check.n_val_pneumonia} pneumonia), "
        f"split seed {check.split['seed']}, fraction {check.split['val_fraction']}",
        "| candidate | val AUC | perturbed val AUC | perturbed sens. | perturbed spec. "
        "| val spec. | threshold |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in check.rows:
        lines.append(
            f"| {r.candidate} | {r.val_auc:.4f} | {r.perturbed_auc:.4f} | "
            f"{r.perturbed_sensitivity:.3f} | {r.perturbed_specificity:.3f} | "
            f"{r.val_specificity:.3f} | {r.threshold:.4f} |"
        )
    return "\n".join(lines)
