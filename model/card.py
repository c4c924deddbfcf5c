"""Model card writer: ``<name>-<version>.md`` (people) and ``.json`` (code) beside the weights.

The card is assembled from what the weights file records (architecture, data split,
training history, machine, calibration, OOD statistics) and from evaluation results
that ``pneumo evaluate --out DIR`` wrote (``DIR/metrics.json``), one per labelled set.
It states the issue's targets on ``kermany/test`` and whether each is met, and by how
much it is missed if not.

Usage (after evaluating each set with ``pneumo evaluate --data ... --out DIR``)::

    python -m model.card --weights model/weights/pneumonet-1.0.0.pt \\
        --eval kermany/test=runs/kermany-test/metrics.json \\
        --eval pneumoniamnist/test=runs/mnist/metrics.json \\
        --ood-check runs/ood-check.json --note "free text" \\
        --experiment resnet18-shift=runs/r18-shift-v2/export/pneumonet-2.0.0.pt:test \\
        --experiment quick=runs/quick/export/pneumonet-2.0.0-quick.pt ...

Each ``--experiment NAME=WEIGHTS[:test]`` adds a row to the card's experiment table
(validation and perturbed-validation figures, CPU time) from what that candidate's
weights file recorded; ``:test`` marks candidates that were scored on ``kermany/test``,
so the card's log says which ones saw it (issue 12: test is scored once per final
candidate, and nothing is chosen on it). ``--experiments-from CARD.json`` carries an
earlier card's rows as they were recorded (a later release keeps the history).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from model.guard_check import NON_CHEST_GROUP, GuardCheck
from model.inference import NOT_CHEST_CODE, read_weights_file, sha256_file

__all__ = [
    "GUARD_MAX_PRIMARY_FLAGGED",
    "GUARD_MIN_NON_CHEST_FLAGGED",
    "INTENDED_USE",
    "LIMITATIONS",
    "METRIC_ORDER",
    "PRIMARY_SET",
    "TARGETS",
    "build_card",
    "experiment_row",
    "guard_target_status",
    "main",
    "render_markdown",
    "target_status",
    "write_model_card",
]

METRIC_ORDER = (
    "roc_auc",
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "pr_auc",
    "brier",
    "ece",
)

#: Issue 3 targets on kermany/test: metric -> (comparison, value).
TARGETS: dict[str, tuple[str, float]] = {
    "roc_auc": (">=", 0.975),
    "sensitivity": (">=", 0.95),
    "specificity": (">=", 0.88),
    "accuracy": (">=", 0.93),
    "ece": ("<=", 0.05),
}
PRIMARY_SET = "kermany/test"

#: Issue 12 targets of the not-a-chest guard: at least this many of the decodable
#: non-chest files of dicom/other flagged, at most this share of the primary set.
GUARD_MIN_NON_CHEST_FLAGGED = 25
GUARD_MAX_PRIMARY_FLAGGED = 0.01

INTENDED_USE = (
    "Triage aid for frontal (PA/AP) chest radiographs of children (the training data are "
    "pediatric, 1-5 years, Guangzhou Women and Children's Medical Center): flags studies "
    "likely to show pneumonia so a radiologist reads them sooner. It is not a diagnosis, "
    "does not replace a radiologist's read, and must not be used for adults, lateral views, "
    "other modalities or other findings."
)

LIMITATIONS = (
    "Trained on one pediatric centre (Kermany et al. 2018); expect lower performance on "
    "adults (domain shift: anatomy, devices, disease spectrum) and on other hospitals' "
    "equipment and processing.",
    "The Kermany test split only exists as 224x224 aspect-squashed JPEGs; every image is "
    "squash-resized to the input size, so the model never sees true aspect ratios, and "
    "results on native-resolution DICOM may differ from the test-set figures.",
    "Labels are the dataset's folder names (bacterial and viral pneumonia pooled); no "
    "radiologist re-read. Patient overlap between Kermany train and test was not checked "
    "upstream.",
    "No pneumonia-positive DICOM was available; the DICOM path was checked for parity with "
    "JPEG and for the not-a-chest guard only.",
    "The not-a-chest guard is a feature-space distance: it rejects images unlike the "
    "training radiographs, not every unsuitable image (e.g. an adult chest film or a "
    "radiograph of an animal may pass).",
)


def _value(entry: Any) -> float | None:
    if isinstance(entry, Mapping):
        v = entry.get("value")
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
    return None


def target_status(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target with the measured value, whether it is met and the gap if not."""
    out: dict[str, dict[str, Any]] = {}
    for name, (op, goal) in TARGETS.items():
        v = _value(metrics.get(name))
        met = None if v is None else (v >= goal if op == ">=" else v <= goal)
        gap = None if v is None or met else round(abs(goal - v), 4)
        out[name] = {"target": f"{op} {goal}", "value": v, "met": met, "missed_by": gap}
    return out


def experiment_row(name: str, weights: Path, *, saw_test: bool = False) -> dict[str, Any]:
    """One row of the experiment table, from what a candidate's weights file recorded."""
    payload = read_weights_file(Path(weights))
    tr = payload.get("training", {})
    plain, shifted = tr.get("validation") or {}, tr.get("validation_perturbed") or {}
    cfg = tr.get("config", {})
    return {
        "candidate": name,
        "arch": payload["net_config"].get("arch", "pneumonet"),
        "recipe": {
            k: cfg.get(k) for k in ("epochs", "shift_prob", "label_smoothing", "mixup", "equalize")
        },
        "epochs_run": tr.get("epochs_run"),
        "val_auc": plain.get("roc_auc"),
        "perturbed_val_auc": shifted.get("roc_auc"),
        "perturbed_val_sensitivity": shifted.get("sensitivity"),
        "perturbed_val_specificity": shifted.get("specificity"),
        "cpu_minutes": round((tr.get("train_seconds") or 0.0) / 60, 1),
        "saw_test": saw_test,
    }


def guard_target_status(
    ood_check: Mapping[str, Any] | None, primary: Mapping[str, Any] | None
) -> dict[str, dict[str, Any]]:
    """The guard's targets, as :func:`target_status` states the metrics' (release gates too).

    From a ``model.guard_check`` JSON's rows (files of dicom/other the reader decoded)
    and the primary evaluation's not-processed count; a target whose input is
    missing is left out.
    """
    out: dict[str, dict[str, Any]] = {}
    check = GuardCheck.from_json(ood_check or {})
    other = check.decoded(NON_CHEST_GROUP)
    if other:
        flagged = check.flagged(NON_CHEST_GROUP)
        met = flagged >= GUARD_MIN_NON_CHEST_FLAGGED
        out[f"dicom/{NON_CHEST_GROUP} non-chest files flagged"] = {
            "target": f">= {GUARD_MIN_NON_CHEST_FLAGGED} of {len(other)}",
            "value": flagged,
            "met": met,
            "missed_by": None if met else GUARD_MIN_NON_CHEST_FLAGGED - flagged,
        }
    if primary and primary.get("n_total"):
        share = int((primary.get("not_processed") or {}).get(NOT_CHEST_CODE, 0)) / int(
            primary["n_total"]
        )
        met = share <= GUARD_MAX_PRIMARY_FLAGGED
        out[f"{PRIMARY_SET} radiographs flagged as not a chest"] = {
            "target": f"<= {GUARD_MAX_PRIMARY_FLAGGED}",
            "value": round(share, 4),
            "met": met,
            "missed_by": None if met else round(share - GUARD_MAX_PRIMARY_FLAGGED, 4),
        }
    return out


def _guard_lines(
    ood_check: Mapping[str, Any] | None, primary: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """The card's guard list: a ``model.guard_check`` JSON's ``summary`` (or a plain mapping),
    plus how many images of the primary test set the guard turned away."""
    lines: dict[str, Any] = {}
    if ood_check:
        lines.update(ood_check.get("summary", ood_check))
    if primary and primary.get("n_total"):
        flagged = int((primary.get("not_processed") or {}).get(NOT_CHEST_CODE, 0))
        total = int(primary["n_total"])
        lines[f"{PRIMARY_SET} chest images flagged (target <= 1 %)"] = (
            f"{flagged} of {total} ({100 * flagged / total:.1f} %)"
        )
    return lines or None


def build_card(
    weights: Path,
    evaluations: Mapping[str, Mapping[str, Any]],
    *,
    ood_check: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    experiments: Sequence[Mapping[str, Any]] = (),
    adaptation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The card as a JSON-ready dict (``adaptation``: a ``model.adapt_check`` JSON)."""
    weights = Path(weights)
    payload = read_weights_file(weights)
    n_params = int(
        sum(
            v.numel()
            for k, v in payload["state_dict"].items()
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
        )
    )
    tr = payload.get("training", {})
    arch = payload["net_config"].get("arch", "pneumonet")
    perturbed = tr.get("validation_perturbed")
    cfg = tr.get("config", {})
    sha = sha256_file(weights)
    evals = {}
    for name, m in evaluations.items():
        evals[name] = {k: m[k] for k in METRIC_ORDER if k in m}
        for k in (
            "n",
            "n_total",
            "n_positive",
            "n_negative",
            "n_not_processed",
            "not_processed",
            "confusion",
            "model_sha256",
            "model_version",
            "threshold",
        ):
            if k in m:
                evals[name][k] = m[k]
        if m.get("model_sha256") not in (None, sha):
            raise ValueError(f"evaluation {name!r} was made with another weights file")
    card: dict[str, Any] = {
        "name": payload["name"],
        "version": payload["version"],
        "weights_file": weights.name,
        "sha256": sha,
        "size_bytes": weights.stat().st_size,
        "card_written": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "intended_use": INTENDED_USE,
        "intended_population": payload.get("intended_population"),
        "max_age_years": payload.get("max_age_years"),
        "data": {
            "training_set": "Kermany et al. 2018 pediatric CXR, 'train' split only "
            "(shared/data/kermany/train)",
            "validation": "carved from train at patient level (personNNN / IM-xxxx), "
            f"val_fraction {tr.get('config', {}).get('val_fraction')}",
            "n_train": tr.get("n_train"),
            "n_train_pneumonia": tr.get("n_train_pneumonia"),
            "n_train_patients": tr.get("n_train_patients"),
            "n_val": tr.get("n_val"),
            "n_val_pneumonia": tr.get("n_val_pneumonia"),
            "n_val_patients": tr.get("n_val_patients"),
            "test_use": "kermany/test was used only for the final evaluation below; no "
            "choice (epochs, threshold, temperature, architecture) was made on it",
        },
        "preprocessing": (
            f"float [0,1] grayscale -> squash-resize to {payload['input_size']}x"
            f"{payload['input_size']} (bilinear, anti-aliased, aspect not kept) -> "
            + (
                "per-image histogram equalisation (256 levels, mid-rank) -> "
                if payload.get("equalize")
                else ""
            )
            + "per-image zero mean / unit variance, clipped to +-6 (model/preprocess.py)"
        ),
        "architecture": {
            "type": (
                "compact ResNet (BasicBlock), 1-channel input, trained from scratch"
                if arch == "pneumonet"
                else f"torchvision {arch} built with weights=None and a 1-channel stem, "
                "trained from scratch"
            ),
            "config": payload["net_config"],
            "parameters": n_params,
            "input_size": payload["input_size"],
            "test_time_augmentation": payload.get("tta"),
        },
        "training": {
            k: tr.get(k)
            for k in (
                "best_epoch",
                "epochs_run",
                "stopped_early",
                "train_seconds",
                "wall_seconds",
                "machine",
                "device",
            )
        }
        | {
            "recipe": "AdamW, warm-up + cosine LR, class-balanced BCE, EMA of weights, "
            "augmentation: mirror, rotation +-10 deg, scale 0.88-1.12, shift +-6 %, "
            "down-up resampling, blur/sharpen, window, gamma, noise"
            + (
                f"; acquisition perturbations (model.shift) on {cfg.get('shift_prob')} of the "
                f"images, label smoothing {cfg.get('label_smoothing')}, mixup "
                f"{cfg.get('mixup')}; early stopping and best epoch on the mean of plain and "
                "perturbed validation ROC AUC"
                if perturbed
                else "; early stopping on validation ROC AUC"
            ),
            "config": tr.get("config"),
            "history": tr.get("history"),
        },
        "calibration": {
            "method": "temperature scaling with a bias term, p = sigmoid(logit / T + b), fitted "
            "by NLL (Guo et al. 2017; Platt 1999) on "
            + ("plain and perturbed validation together" if perturbed else "validation")
            + ("; mirror-TTA logits" if payload.get("tta") != "none" else ""),
            "temperature": payload["temperature"],
            "bias": payload.get("bias", 0.0),
            "threshold": payload["threshold"],
            "threshold_rule": "highest threshold with "
            + ("perturbed-validation" if perturbed else "validation")
            + f" sensitivity >= {payload.get('target_sensitivity')}",
            "validation": tr.get("validation"),
            "validation_perturbed": perturbed,
        },
        "ood_guard": {
            "method": "per-stage Mahalanobis distance (Lee et al. 2018) on the channel "
            "mean/std of each ResNet stage, fitted on training radiographs, each "
            "normalised by its validation 99.5th percentile; score = max over "
            "stages; threshold = 1.25 x the validation 99.5th percentile",
            "threshold": float(payload["ood"]["threshold"]),
            "check": _guard_lines(ood_check, evals.get(PRIMARY_SET)),
        },
        "evaluations": evals,
        "experiments": [dict(row) for row in experiments],
        "test_log": [row["candidate"] for row in experiments if row.get("saw_test")],
        "adaptation": dict(adaptation) if adaptation else None,
        "targets": target_status(evaluations.get(PRIMARY_SET, {}))
        | guard_target_status(ood_check, evals.get(PRIMARY_SET)),
        "limitations": list(LIMITATIONS),
        "notes": list(notes),
    }
    return card


def _fmt_metric(entry: Any) -> str:
    if not isinstance(entry, Mapping) or entry.get("value") is None:
        return "n/a"
    ci = entry.get("ci95") or [None, None]
    if ci[0] is None or ci[1] is None:
        return f"{entry['value']:.3f}"
    return f"{entry['value']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _fmt_plain(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def render_markdown(card: Mapping[str, Any]) -> str:
    """The human card."""
    L: list[str] = []
    L.append(f"# Model card: {card['name']} {card['version']}\n")
    L.append(
        f"Weights `{card['weights_file']}` ({card['size_bytes'] / 1e6:.1f} MB), "
        f"sha256 `{card['sha256']}`.\n"
    )
    L.append("## Intended use\n")
    L.append(card["intended_use"] + "\n")
    d = card["data"]
    L.append("## Data and split\n")
    L.append(
        f"- Training: {d['training_set']}: {d['n_train']} images "
        f"({d['n_train_pneumonia']} pneumonia) from {d['n_train_patients']} patients."
    )
    L.append(
        f"- Validation ({d['validation']}): {d['n_val']} images "
        f"({d['n_val_pneumonia']} pneumonia) from {d['n_val_patients']} patients."
    )
    L.append(f"- {d['test_use']}.\n")
    L.append("## Preprocessing\n")
    L.append(card["preprocessing"] + ".\n")
    a = card["architecture"]
    L.append("## Architecture\n")
    L.append(
        f"{a['type']}; config `{json.dumps(a['config'])}`; {a['parameters']:,} parameters; "
        f"input {a['input_size']}x{a['input_size']}; test-time augmentation: "
        f"{a['test_time_augmentation']}.\n"
    )
    t = card["training"]
    L.append("## Training\n")
    mins = (t.get("train_seconds") or 0) / 60
    L.append(
        f"{t['recipe']}. {t.get('epochs_run')} epochs run, best epoch {t.get('best_epoch')}"
        f"{' (early stop)' if t.get('stopped_early') else ''}; {mins:.1f} min of training "
        f"epochs (summed over resumed runs; calibration and export take ~2 min more), on "
        f"{t.get('machine')} ({t.get('device')}).\n"
    )
    if t.get("history"):
        L.append("| epoch | train loss | val loss | val AUC | perturbed val AUC | seconds |")
        L.append("|---|---|---|---|---|---|")
        for h in t["history"]:
            shifted = h.get("val_auc_perturbed")
            L.append(
                f"| {h['epoch']} | {h['train_loss']:.4f} | {h['val_loss']:.4f} | "
                f"{h['val_auc']:.4f} | {'n/a' if shifted is None else f'{shifted:.4f}'} | "
                f"{h['seconds']:.0f} |"
            )
        L.append("")
    if card.get("experiments"):
        L.append("## Experiments (chosen on validation, never on test)\n")
        L.append(
            "| candidate | arch | epochs | val AUC | perturbed val AUC | perturbed sens. | "
            "perturbed spec. | CPU min | scored on test |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|")
        for r in card["experiments"]:
            cells = [
                "n/a" if r.get(k) is None else f"{r[k]:.4f}"
                for k in (
                    "val_auc",
                    "perturbed_val_auc",
                    "perturbed_val_sensitivity",
                    "perturbed_val_specificity",
                )
            ]
            L.append(
                f"| {r['candidate']} | {r['arch']} | {r.get('epochs_run')} | "
                + " | ".join(cells)
                + f" | {r.get('cpu_minutes')} | {'yes' if r.get('saw_test') else 'no'} |"
            )
        L.append(
            "\nCandidates scored on kermany/test: "
            + (", ".join(card["test_log"]) or "none")
            + ".\n"
        )
    c = card["calibration"]
    L.append("## Calibration and operating point\n")
    L.append(
        f"{c['method']}: temperature **{c['temperature']:.4f}**, bias "
        f"**{c['bias']:.4f}**; operating threshold "
        f"**{c['threshold']:.4f}** on the calibrated probability ({c['threshold_rule']})."
    )
    for key, label in (
        ("validation", "validation"),
        ("validation_perturbed", "perturbed validation"),
    ):
        v = c.get(key)
        if v:
            L.append(
                f"On {label}: AUC {v['roc_auc']:.4f}, sensitivity {v['sensitivity']:.3f}, "
                f"specificity {v['specificity']:.3f}, ECE {v['ece_uncalibrated']:.3f} before / "
                f"{v['ece']:.3f} after calibration (fitted and measured on the same split)."
            )
    L.append("")
    o = card["ood_guard"]
    L.append("## Not-a-chest-radiograph guard\n")
    L.append(
        f"{o['method']}. Threshold **{o['threshold']:.3f}**: images scoring above it are "
        "reported as 'not processed: not a chest radiograph' instead of a probability."
    )
    if o.get("check"):
        L.append("")
        for k, v in o["check"].items():
            L.append(f"- {k}: {v}")
    L.append("")
    L.append("## Evaluation (95 % stratified bootstrap CIs, at the shipped threshold)\n")
    L.append("| data set | n | " + " | ".join(METRIC_ORDER) + " |")
    L.append("|---|---|" + "---|" * len(METRIC_ORDER))
    for name, m in card["evaluations"].items():
        cells = [_fmt_metric(m.get(k)) for k in METRIC_ORDER]
        n = m.get("n")
        extra = f" ({m.get('n_not_processed')} not processed)" if m.get("n_not_processed") else ""
        L.append(f"| {name} | {n}{extra} | " + " | ".join(cells) + " |")
    L.append("")
    L.append(f"## Targets on {PRIMARY_SET} and of the not-a-chest guard\n")
    L.append("| metric | target | measured | met |")
    L.append("|---|---|---|---|")
    for name, s in card["targets"].items():
        value = s["value"]
        val = "n/a" if value is None else (str(value) if isinstance(value, int) else f"{value:.4f}")
        met = (
            "n/a"
            if s["met"] is None
            else ("yes" if s["met"] else f"**no** (missed by {s['missed_by']})")
        )
        L.append(f"| {name} | {s['target']} | {val} | {met} |")
    L.append("")
    if card.get("adaptation"):
        a = card["adaptation"]
        L.append(f"## Label-free site adaptation (on {a['dataset']}, apart from the targets)\n")
        L.append(
            f"Protocol: {a['protocol']}. AdaBN with the not-a-chest guard re-centred"
            + (" and the class prior by EM" if a.get("prior") else "")
            + "; no label of the adapting half is read. `pneumo model adapt --data DIR` "
            "makes such a version for a site; the shipped model is the plain one.\n"
        )
        names = ("roc_auc", "sensitivity", "specificity", "accuracy", "ece")
        L.append("| adapted on | scored on | n | " + " | ".join(names) + " |")
        L.append("|---|---|---|" + "---|" * len(names))
        for h in a["halves"]:
            cells = [
                f"{_fmt_plain(h['plain'].get(m))} -> {_fmt_plain(h['adapted'].get(m))}"
                for m in names
            ]
            L.append(
                f"| {h['adapted_on']} | {h['scored_on']} | {h['n_scored']} | "
                + " | ".join(cells)
                + " |"
            )
        L.append("\n(plain -> adapted, at each model's own threshold)\n")
    L.append("## Known limitations\n")
    for item in card["limitations"]:
        L.append(f"- {item}")
    if card.get("notes"):
        L.append("\n## Notes\n")
        for item in card["notes"]:
            L.append(f"- {item}")
    L.append("")
    return "\n".join(L)


def write_model_card(
    weights: Path,
    evaluations: Mapping[str, Mapping[str, Any]],
    *,
    ood_check: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    out_dir: Path | None = None,
    experiments: Sequence[Mapping[str, Any]] = (),
    adaptation: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.json`` beside the weights (or in ``out_dir``)."""
    weights = Path(weights)
    card = build_card(
        weights,
        evaluations,
        ood_check=ood_check,
        notes=notes,
        experiments=experiments,
        adaptation=adaptation,
    )
    out = Path(out_dir) if out_dir else weights.parent
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{weights.stem}.md"
    js = out / f"{weights.stem}.json"
    js.write_text(json.dumps(card, indent=2, allow_nan=False, default=str) + "\n")
    md.write_text(render_markdown(card))
    return md, js


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.card", description=__doc__.split("\n")[0])
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument(
        "--eval",
        action="append",
        default=[],
        metavar="NAME=METRICS_JSON",
        help="an evaluation's metrics.json (repeatable)",
    )
    p.add_argument(
        "--ood-check", type=Path, help="the guard check's JSON (`pneumo model guard --out`)"
    )
    p.add_argument(
        "--adaptation",
        type=Path,
        help="the split-half adaptation result (`pneumo model adapt-check --out`)",
    )
    p.add_argument("--note", action="append", default=[])
    p.add_argument(
        "--experiment",
        action="append",
        default=[],
        metavar="NAME=WEIGHTS[:test]",
        help="a candidate for the experiment table; ':test' if it was scored on kermany/test",
    )
    p.add_argument(
        "--experiments-from",
        type=Path,
        action="append",
        default=[],
        metavar="CARD_JSON",
        help="carry the experiment rows of an earlier card (its candidates' weights need not exist)",
    )
    p.add_argument("--out-dir", type=Path)
    args = p.parse_args(argv)
    evaluations = {}
    for spec in args.eval:
        name, _, file = spec.partition("=")
        if not file:
            p.error(f"--eval needs NAME=FILE, got {spec!r}")
        evaluations[name] = json.loads(Path(file).read_text())
    ood = json.loads(args.ood_check.read_text()) if args.ood_check else None
    adaptation = json.loads(args.adaptation.read_text()) if args.adaptation else None
    experiments = [
        dict(row)
        for card in args.experiments_from
        for row in json.loads(card.read_text()).get("experiments", [])
    ]
    for spec in args.experiment:
        name, _, file = spec.partition("=")
        if not file:
            p.error(f"--experiment needs NAME=WEIGHTS[:test], got {spec!r}")
        saw_test = file.endswith(":test")
        experiments.append(
            experiment_row(name, Path(file.removesuffix(":test")), saw_test=saw_test)
        )
    md, js = write_model_card(
        args.weights,
        evaluations,
        ood_check=ood,
        notes=args.note,
        out_dir=args.out_dir,
        experiments=experiments,
        adaptation=adaptation,
    )
    print(md)
    print(js)
    return 0


if __name__ == "__main__":
    sys.exit(main())
