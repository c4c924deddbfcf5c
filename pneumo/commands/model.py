"""``pneumo train`` and ``pneumo evaluate``.

This module composes the packages: ``model`` never imports ``dicom_io``, so the
DICOM pixel reader is handed to the evaluation from here. Heavy imports (torch,
matplotlib) happen inside the command functions, so ``pneumo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import Any

from pneumo.exit_codes import ExitCode

__all__ = [
    "TRAIN_OPTIONS",
    "TRAIN_RECIPES",
    "register",
    "run_adapt",
    "run_adapt_check",
    "run_ensemble_check",
    "run_monitor",
    "run_evaluate",
    "run_guard",
    "run_train",
    "train_config_kwargs",
]

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _register_train(subparsers)
    _register_evaluate(subparsers)
    _register_model(subparsers)
    _register_monitor(subparsers)


# --- monitor ------------------------------------------------------------------


def _register_monitor(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "monitor",
        help="weekly drift of production scores against the validation reference",
        description=(
            "Compare production results with the model's validation reference (model.monitoring): "
            "population stability index of the scores, not-a-chest and outside-intended-use "
            "rates per ISO week; warns when a week's PSI exceeds --psi-alert."
        ),
    )
    p.add_argument(
        "--since",
        type=dt.date.fromisoformat,
        metavar="YYYY-MM-DD",
        help="only results from this day on (default: the last 8 weeks)",
    )
    p.add_argument("--out", type=Path, metavar="DIR", help="write summary.json and PNG plots here")
    p.add_argument(
        "--reference",
        type=Path,
        metavar="CSV",
        help="predictions.csv of `pneumo evaluate` on validation data (default: the "
        "reference stored in the weights file)",
    )
    _add_model_argument(p)
    p.add_argument(
        "--psi-alert",
        type=float,
        default=None,
        metavar="X",
        help="PSI above which a week is flagged (default: 0.25)",
    )
    p.set_defaults(func=run_monitor)


def _production_results(since: dt.datetime) -> list[Any]:
    """Results since ``since`` from the database, as ``model.monitoring.ScoredResult``."""
    from db.engine import session_scope
    from db.repository import recent_results
    from model.inference import NOT_CHEST_CODE
    from model.monitoring import ScoredResult
    from pneumo.settings import load_settings
    from worker.flags import ResultFlag

    with session_scope(load_settings().effective_database_url) as session:
        rows = recent_results(session, limit=1_000_000)
    return [
        ScoredResult(
            created_at=r.created_at,
            probability=r.probability,
            not_chest=NOT_CHEST_CODE in r.flags,
            outside_intended_use=ResultFlag.OUTSIDE_INTENDED_USE.value in r.flags,
            finding=r.finding,
        )
        for r in rows
        if r.created_at.replace(tzinfo=None) >= since.replace(tzinfo=None)
    ]


def _reference_scores(args: argparse.Namespace) -> list[float]:
    """Validation probabilities: from --reference, else from the weights file."""
    if args.reference is not None:
        from model.evaluation import read_predictions_csv

        return [
            r.probability for r in read_predictions_csv(args.reference) if r.probability is not None
        ]
    from model.inference import read_weights_file

    weights = _weights_path(args)
    payload = read_weights_file(weights)
    ref = payload.get("monitoring_reference")
    if ref is None:
        raise ValueError(f"{Path(weights).name} stores no validation reference; pass --reference")
    return [float(x) for x in ref]


def run_monitor(args: argparse.Namespace) -> int:
    from model.monitoring import DEFAULT_PSI_ALERT, weekly_summaries

    since = (
        dt.datetime.combine(args.since, dt.time())
        if args.since
        else dt.datetime.now() - dt.timedelta(weeks=8)
    )
    try:
        reference = _reference_scores(args)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # RuntimeError: WeightsError
        print(f"pneumo monitor: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        results = _production_results(since)
    except Exception as exc:  # database unreachable or not migrated
        print(f"pneumo monitor: error: database: {type(exc).__name__}: {exc}", file=sys.stderr)
        return ExitCode.UNAVAILABLE
    alert = DEFAULT_PSI_ALERT if args.psi_alert is None else args.psi_alert
    weeks = weekly_summaries(results, reference, psi_alert=alert)
    summary = {
        "since": since.date().isoformat(),
        "psi_alert": alert,
        "n_reference": len(reference),
        "weeks": [w.to_dict() for w in weeks],
    }
    print(f"{'week':<9} {'n':>6} {'PSI':>7} {'not-chest':>9} {'outside use':>11}")
    for w in weeks:
        psi = "n/a" if w.psi is None else f"{w.psi:.3f}"
        print(
            f"{w.week:<9} {w.n:>6} {psi:>7} {w.not_chest_rate:>9.3f} "
            f"{w.outside_intended_use_rate:>11.3f}{'  DRIFT' if w.drift else ''}"
        )
    drifted = [w.week for w in weeks if w.drift]
    if drifted:
        print(
            f"pneumo monitor: warning: score drift (PSI > {alert}) in {', '.join(drifted)}",
            file=sys.stderr,
        )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _monitor_plots(weeks, alert, args.out)
    return ExitCode.OK


def _monitor_plots(weeks: list[Any], alert: float, out: Path) -> None:
    """``psi.png`` and ``rates.png``: one point per week."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [w.week for w in weeks]
    for name, series in (
        ("psi.png", {"PSI": [w.psi if w.psi is not None else float("nan") for w in weeks]}),
        (
            "rates.png",
            {
                "not a chest radiograph": [w.not_chest_rate for w in weeks],
                "outside intended use": [w.outside_intended_use_rate for w in weeks],
            },
        ),
    ):
        fig = Figure(figsize=(6, 3.5), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for label, ys in series.items():
            ax.plot(labels, ys, marker="o", label=label)
        if name == "psi.png":
            ax.axhline(alert, color="#d62728", linestyle="--", label=f"alert {alert}")
        ax.set(xlabel="ISO week", title=name.removesuffix(".png"))
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelrotation=45)
        fig.savefig(out / name)


# --- model adapt --------------------------------------------------------------


def _register_model(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("model", help="derive a new model version (site adaptation)")
    sub = p.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    a = sub.add_parser(
        "adapt",
        help="re-estimate normalisation statistics (and the class prior) on unlabelled images",
        description=(
            "Label-free site adaptation (model.adapt): writes a new weights file whose "
            "BatchNorm statistics come from the site's images under --data (JPEG/PNG/DICOM, "
            "searched recursively; folder names and any labels are ignored)."
        ),
    )
    a.add_argument(
        "--data",
        required=True,
        type=Path,
        metavar="DIR",
        help="folder of the site's unlabelled images",
    )
    a.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="FILE",
        help="the adapted weights file to write (<name>-<version>.pt)",
    )
    a.add_argument("--version", required=True, help="version of the adapted model")
    _add_model_argument(a)
    a.add_argument(
        "--prior",
        action="store_true",
        help="also re-estimate the share of pneumonia at the site (EM)",
    )
    a.add_argument(
        "--limit", type=int, default=2000, metavar="N", help="use at most N images (default: 2000)"
    )
    a.set_defaults(func=run_adapt)
    c = sub.add_parser(
        "adapt-check",
        help="split-half test of site adaptation on a labelled folder from the new site",
        description=(
            "The honest protocol for label-free adaptation (model.adapt_check): split --data "
            "(NORMAL/ and PNEUMONIA/) in two halves by patient, adapt on one half's images "
            "without their labels, score plain and adapted models on the other half; swap. "
            "Prints both halves side by side; --out writes JSON for python -m model.card "
            "--adaptation."
        ),
    )
    c.add_argument("--data", required=True, type=Path, metavar="DIR", help="labelled folder")
    c.add_argument("--out", type=Path, metavar="FILE", help="write the result as JSON here")
    c.add_argument(
        "--work-dir",
        type=Path,
        metavar="DIR",
        help="where the two adapted weights files go (default: a temporary folder)",
    )
    c.add_argument("--prior", action="store_true", help="also adapt the class prior (EM)")
    _add_model_argument(c)
    c.set_defaults(func=run_adapt_check)
    e = sub.add_parser(
        "ensemble-check",
        help="score trained candidates and their logit-mean ensemble on validation only",
        description=(
            "model.ensemble_check: each weights file and the ensemble averaging their logits, "
            "on the plain and perturbed validation views of their common patient split, with "
            "the shipped operating rule (Platt on both views, threshold for the target "
            "sensitivity on the perturbed view). kermany/test is not read."
        ),
    )
    e.add_argument("weights", nargs="+", type=Path, metavar="WEIGHTS", help="two or more members")
    e.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        default=None,
        help="the training folder the members were trained on (default: the recipe's)",
    )
    e.add_argument("--cache-dir", type=Path, metavar="DIR", help="decoded-pixel cache folder")
    e.add_argument("--out", type=Path, metavar="FILE", help="write the figures as JSON here")
    e.add_argument(
        "--limit",
        type=int,
        default=0,
        metavar="N",
        help="only N validation images per class (a quick look; default: all)",
    )
    e.set_defaults(func=run_ensemble_check)
    g = sub.add_parser(
        "guard",
        help="score the not-a-chest guard on chest and non-chest DICOM files it never saw",
        description=(
            "Run the not-a-chest-radiograph guard (model.guard_check) over DATA/dicom/cxr "
            "(real chest radiographs, which should pass) and DATA/dicom/other (non-chest "
            "images, which should be flagged); prints one row per file and the counts the "
            "model card reports (--out writes them as JSON for python -m model.card --ood-check). "
            "--reference runs it on the development non-chest images instead (synthetic and "
            "package-shipped pictures, no test file), the check a candidate passes before "
            "any test set is scored; --gate then exits 1 if the guard lets one through."
        ),
    )
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="folder holding dicom/cxr and dicom/other (e.g. the shared data folder)",
    )
    source.add_argument(
        "--reference",
        action="store_true",
        help="the development non-chest images (model.ood.non_chest_reference_images)",
    )
    g.add_argument(
        "--gate",
        action="store_true",
        help="exit 1 when a non-chest image passes the guard (a release gate)",
    )
    g.add_argument("--out", type=Path, metavar="FILE", help="write the check as JSON here")
    g.add_argument("--format", choices=("table", "json"), default="table")
    _add_model_argument(g)
    g.set_defaults(func=run_guard)


def _site_images(folder: Path, limit: int) -> tuple[list[Any], int]:
    """Decoded images under ``folder`` (sorted, at most ``limit``) and how many failed."""
    from dicom_io.pixels import PixelReadError, read_pixels_file
    from model.evaluation_sets import DICOM_SUFFIXES
    from model.images import IMAGE_SUFFIXES, ImageLoadError, load_image_file

    images: list[Any] = []
    failed = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if len(images) >= limit:
            break
        suffix = path.suffix.lower()
        try:
            if suffix in IMAGE_SUFFIXES:
                images.append(load_image_file(path))
            elif suffix in DICOM_SUFFIXES:
                images.append(read_pixels_file(path))
        except (ImageLoadError, PixelReadError, OSError):
            failed += 1
    return images, failed


def run_adapt(args: argparse.Namespace) -> int:
    from model.adapt import adapt_weights
    from model.inference import WeightsError

    if not args.data.is_dir():
        print(f"pneumo model adapt: error: --data is not a folder: {args.data}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        source = _weights_path(args)
    except WeightsError as exc:
        print(f"pneumo model adapt: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    images, failed = _site_images(args.data, args.limit)
    try:
        result = adapt_weights(source, images, args.out, args.version, adapt_prior=args.prior)
    except (ValueError, WeightsError) as exc:
        print(f"pneumo model adapt: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    prior = (
        ""
        if result.prior_site is None
        else (f"; pneumonia share {result.prior_source:.2f} -> {result.prior_site:.2f}")
    )
    print(f"{result.path} (from {result.n_images} images, {failed} unreadable{prior})")
    return ExitCode.OK


def run_adapt_check(args: argparse.Namespace) -> int:
    import tempfile

    from dicom_io.pixels import read_pixels_file
    from model.adapt_check import REPORTED_METRICS, split_half_adaptation
    from model.evaluation_sets import DatasetError, open_dataset
    from model.inference import WeightsError

    try:
        dataset = open_dataset(args.data, read_dicom=read_pixels_file)
        weights = _weights_path(args)
    except (DatasetError, WeightsError) as exc:
        print(f"pneumo model adapt-check: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    with tempfile.TemporaryDirectory(prefix="pneumo-adapt-") as tmp:
        try:
            check = split_half_adaptation(
                weights,
                dataset,
                args.work_dir or Path(tmp),
                prior=args.prior,
                progress=lambda step: log.info("%s", step),
            )
        except ValueError as exc:
            print(f"pneumo model adapt-check: error: {exc}", file=sys.stderr)
            return ExitCode.USAGE
    if args.out is not None:
        check.write_json(args.out)
    print(
        f"{'adapted on':>10} {'scored on':>9} {'n':>5}  "
        + "  ".join(f"{m:>17}" for m in REPORTED_METRICS)
    )
    for h in check.halves:
        cells = "  ".join(
            f"{_num(h.plain[m]):>7} -> {_num(h.adapted[m]):>7}" for m in REPORTED_METRICS
        )
        print(f"{h.adapted_on:>10} {h.scored_on:>9} {h.n_scored:>5}  {cells}")
    print("(plain -> adapted; the adapted model never saw the images it is scored on)")
    return ExitCode.OK


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run_ensemble_check(args: argparse.Namespace) -> int:
    from model.ensemble_check import ensemble_check, format_check
    from model.train import TrainConfig

    try:
        check = ensemble_check(
            args.weights,
            args.data or TrainConfig().data,
            cache_dir=args.cache_dir,
            limit=args.limit,
        )
    except (OSError, ValueError) as exc:
        print(f"pneumo model ensemble-check: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    print(format_check(check))
    if args.out is not None:
        args.out.write_text(json.dumps(check.to_dict(), indent=2) + "\n")
    return ExitCode.OK


def run_guard(args: argparse.Namespace) -> int:
    from dicom_io.pixels import read_luminance_file
    from model.guard_check import (
        NON_CHEST_GROUP,
        REFERENCE_GROUP,
        check_guard,
        check_reference,
        shared_dicom_files,
    )
    from model.inference import WeightsError, load_predictor

    files = {} if args.reference else shared_dicom_files(args.data)
    if not args.reference and not any(files.values()):
        print(
            f"pneumo model guard: error: no DICOM files under {args.data}/dicom/cxr or /other",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    try:
        predictor = load_predictor(_weights_path(args))
    except (WeightsError, OSError, ValueError) as exc:
        print(f"pneumo model guard: error: cannot load the model: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    if args.reference:
        check = check_reference(predictor)
    else:
        check = check_guard(predictor, files, read_luminance_file)  # colour images too
    if args.out is not None:
        check.write_json(args.out)
    passed = check.passed(NON_CHEST_GROUP, REFERENCE_GROUP)
    status = ExitCode.FAILED if args.gate and passed else ExitCode.OK
    if status is ExitCode.FAILED:
        print(
            f"pneumo model guard: gate failed: {len(passed)} non-chest image(s) pass the guard",
            file=sys.stderr,
        )
    if args.format == "json":
        print(json.dumps(check.to_json(), indent=2))
        return status
    print(f"{'group':6} {'file':44} {'OOD':>7} {'p':>6}  outcome")
    for r in check.rows:
        ood = "" if r.ood_score is None else f"{r.ood_score:.2f}"
        prob = "" if r.probability is None else f"{r.probability:.3f}"
        detail = f" ({r.detail})" if r.detail else ""
        print(f"{r.group:6} {r.file[:44]:44} {ood:>7} {prob:>6}  {r.outcome.value}{detail}")
    for label, value in check.summary().items():
        print(f"{label}: {value}")
    return status


# --- evaluate ---------------------------------------------------------------


def _register_evaluate(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score the model on a labelled data set, with 95%% bootstrap CIs",
        description=(
            "Evaluate the pneumonia model at its shipped operating threshold. PATH is a folder "
            "with NORMAL/ and PNEUMONIA/ subfolders of JPEG/PNG or DICOM files, or a "
            "PneumoniaMNIST .npz. Images that cannot be read, or that the guard flags as not a "
            "chest radiograph, are listed as not processed and left out of the metrics."
        ),
    )
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        metavar="PATH",
        help="folder with NORMAL/ and PNEUMONIA/, or an .npz file",
    )
    _add_model_argument(p)
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="write metrics.json, predictions.csv and PNG plots here",
    )
    p.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="what to print on stdout (default: table)",
    )
    p.add_argument(
        "--split",
        default="test",
        choices=("train", "val", "test"),
        help="split of an .npz file (default: test)",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="bootstrap resamples for the 95%% CIs (default: 1000; 0 = none)",
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        metavar="N",
        help="images per forward pass (default: 32)",
    )
    p.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="evaluate a seeded, class-stratified subset of N images (quick checks)",
    )
    p.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
    p.add_argument("--no-plots", action="store_true", help="with --out: skip the PNG plots")
    p.set_defaults(func=run_evaluate)


def _default_model_path() -> Path | None:
    try:
        from pneumo.settings import load_settings

        return load_settings().model_path
    except Exception as exc:  # a broken unrelated setting must not block evaluation
        log.warning("settings not loaded (%s); using the shipped model", type(exc).__name__)
        return None


def _add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        type=Path,
        metavar="FILE",
        help="weights file (default: PNEUMO_MODEL_PATH or the shipped model)",
    )


def _weights_path(args: argparse.Namespace) -> Path:
    """--model, else PNEUMO_MODEL_PATH, else the shipped weights.

    Raises:
        model.inference.WeightsError: no weights file is shipped.
    """
    from model.inference import default_weights_path

    return Path(args.model or _default_model_path() or default_weights_path())


def _fail(message: str) -> int:
    print(f"pneumo evaluate: error: {message}", file=sys.stderr)
    return ExitCode.USAGE


def run_evaluate(args: argparse.Namespace) -> int:
    from dicom_io.pixels import read_pixels_file
    from model.evaluation import evaluate, format_table, write_outputs
    from model.evaluation_sets import DatasetError, open_dataset, stratified_subset

    if args.bootstrap < 0 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        return _fail("--bootstrap must be >= 0, --batch-size and --limit >= 1")
    try:
        dataset = open_dataset(args.data, split=args.split, read_dicom=read_pixels_file)
    except DatasetError as exc:
        return _fail(str(exc))
    if args.limit is not None:
        dataset = stratified_subset(dataset, args.limit, seed=args.seed)

    weights = args.model if args.model is not None else _default_model_path()
    if weights is not None and not Path(weights).is_file():
        return _fail(f"model file not found: {weights}")
    try:
        from model.inference import load_predictor

        predictor = load_predictor(weights, device=args.device)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        return _fail(f"cannot load the model: {exc}")

    from tqdm import tqdm

    with tqdm(
        total=len(dataset), desc="evaluate", unit="img", file=sys.stderr, disable=None, leave=False
    ) as bar:
        result = evaluate(
            predictor,
            dataset,
            n_bootstrap=args.bootstrap,
            seed=args.seed,
            batch_size=args.batch_size,
            progress=bar.update,
        )

    if args.out is not None:
        written = write_outputs(result, args.out, plots=not args.no_plots)
        log.info("wrote %d files to %s", len(written), args.out)
    if args.format == "json":
        print(json.dumps(result.to_json(), allow_nan=False))
    else:
        print(format_table(result))
    # FAILED: the run worked but nothing (or only one class) could be scored
    return ExitCode.OK if result.metrics is not None else ExitCode.FAILED


# --- train ------------------------------------------------------------------

#: Names of ``model.train.RECIPES`` (spelled out for the same reason as TRAIN_OPTIONS).
TRAIN_RECIPES = ("full", "quick", "1.0.0")

# One entry per field of ``model.train.TrainConfig``: (type, help). Only options
# given on the command line are passed on (argparse.SUPPRESS), so the defaults
# live in exactly one place -- TrainConfig. The table is spelled out instead of
# introspected because importing model.train imports torch (2-3 s), which every
# other ``pneumo`` command would then pay; tests/model_evaluation checks that
# this table and TrainConfig name the same fields with the same types.
TRAIN_OPTIONS: dict[str, tuple[type, str]] = {
    "data": (Path, "training folder with NORMAL/ and PNEUMONIA/ (default: kermany/train)"),
    "work_dir": (Path, "checkpoints and pixel cache; a rerun resumes from here"),
    "out_dir": (Path, "where <name>-<version>.pt and its model card are written"),
    "name": (str, "model name"),
    "version": (str, "model version"),
    "epochs": (int, "maximum number of epochs"),
    "batch_size": (int, "images per optimisation step"),
    "lr": (float, "peak learning rate (AdamW)"),
    "weight_decay": (float, "AdamW weight decay"),
    "warmup_epochs": (float, "linear learning-rate warm-up, in epochs"),
    "ema_decay": (float, "decay of the weight moving average that is evaluated and shipped"),
    "val_fraction": (float, "share of patients held out for validation"),
    "seed": (int, "random seed (split, initialisation, augmentation)"),
    "patience": (int, "early stopping: epochs without gain in mean plain/perturbed val AUC"),
    "width": (int, "channels of the first ResNet stage"),
    "blocks": (str, "residual blocks per stage, comma-separated"),
    "dropout": (float, "dropout before the classifier"),
    "arch": (
        str,
        "network: pneumonet (ours), or resnet18, resnet34, efficientnet_b0, densenet121"
        " (torchvision, from scratch)",
    ),
    "shift_prob": (float, "share of training images given acquisition-like perturbations"),
    "label_smoothing": (float, "label smoothing of the BCE targets"),
    "mixup": (float, ">0: mixup with Beta(a, a) mixing weights"),
    "equalize": (bool, "histogram-equalise every image before standardising (serving follows)"),
    "input_size": (int, "side of the square network input"),
    "target_sensitivity": (float, "operating threshold: sensitivity on validation"),
    "ood_quantile": (float, "not-a-chest guard: quantile of validation OOD scores"),
    "ood_margin": (float, "not-a-chest guard: factor on that quantile"),
    "limit": (int, ">0: only this many images per class (smoke runs)"),
    "max_minutes": (float, ">0: start no new epoch after this many minutes"),
    "resume": (bool, "resume from the last checkpoint in --work-dir"),
    "device": (str, "torch device ('' = CUDA when present, else CPU)"),
    "threads": (int, "torch CPU threads (0 = torch default)"),
    "channels_last": (bool, "NHWC memory layout (faster on CPU for the torchvision ResNets)"),
    "tta": (str, "test-time augmentation: hflip-mean-logit or none"),
    "weights_dtype": (str, "dtype of the shipped weights: float32 or float16"),
    "progress": (bool, "show a progress bar"),
}


def _register_train(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the pneumonia CNN (reproducible, resumable, early stopping)",
        description=(
            "Train, calibrate and export the model. --recipe picks a named recipe "
            "(model.train.RECIPES); the options below override single fields of it. Rerunning "
            "the same command after an interruption resumes from the last checkpoint in "
            "--work-dir."
        ),
    )
    p.add_argument(
        "--recipe",
        choices=TRAIN_RECIPES,
        default="full",
        help="full: the pneumonet-2.0.0 recipe (~1.2 h CPU); quick: under an hour, for "
        "sites that retrain; 1.0.0: the first release (default: full)",
    )
    for name, (kind, help_text) in TRAIN_OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            p.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            p.add_argument(
                flag,
                dest=name,
                type=kind,
                default=argparse.SUPPRESS,
                metavar=name.upper(),
                help=help_text,
            )
    p.set_defaults(func=run_train)


def train_config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig keyword arguments the user gave (absent ones keep their defaults)."""
    return {name: getattr(args, name) for name in TRAIN_OPTIONS if hasattr(args, name)}


def run_train(args: argparse.Namespace) -> int:
    from model.train import TrainConfig, run_training

    try:
        config = TrainConfig.for_recipe(
            getattr(args, "recipe", "full"), **train_config_kwargs(args)
        )
    except (TypeError, ValueError) as exc:
        print(f"pneumo train: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        weights = run_training(config)
    except KeyboardInterrupt:
        print("pneumo train: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130  # 128 + SIGINT: the shell convention for an interrupted command
    except (OSError, ValueError) as exc:
        print(f"pneumo train: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    print(weights)
    return ExitCode.OK
