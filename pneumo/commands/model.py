"""``pneumo train`` and ``pneumo evaluate``.

This module composes the packages: ``model`` never imports ``dicom_io``, so the
DICOM pixel reader is handed to the evaluation from here. Heavy imports (torch,
matplotlib) happen inside the command functions, so ``pneumo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_NO_METRICS = 1  # the run worked but nothing (or only one class) could be scored
EXIT_USAGE = 2  # bad data path, unreadable model file, ...


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_train(subparsers)
    _register_evaluate(subparsers)


# --- evaluate ---------------------------------------------------------------


def _register_evaluate(subparsers: argparse._SubParsersAction) -> None:
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
    p.add_argument("--data", required=True, type=Path, metavar="PATH",
                   help="folder with NORMAL/ and PNEUMONIA/, or an .npz file")
    p.add_argument("--model", type=Path, metavar="FILE",
                   help="weights file (default: PNEUMO_MODEL_PATH or the shipped model)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write metrics.json, predictions.csv and PNG plots here")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="what to print on stdout (default: table)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="split of an .npz file (default: test)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples for the 95%% CIs (default: 1000; 0 = none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="images per forward pass (default: 32)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="evaluate a seeded, class-stratified subset of N images (quick checks)")
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


def _fail(message: str) -> int:
    print(f"pneumo evaluate: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run_evaluate(args: argparse.Namespace) -> int:
    from dicom_io.pixels import read_pixels_file
    from model.datasets import DatasetError, open_dataset, stratified_subset
    from model.evaluation import evaluate, format_table, write_outputs

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

    with tqdm(total=len(dataset), desc="evaluate", unit="img", file=sys.stderr,
              disable=None, leave=False) as bar:
        result = evaluate(predictor, dataset, n_bootstrap=args.bootstrap, seed=args.seed,
                          batch_size=args.batch_size, progress=bar.update)

    if args.out is not None:
        written = write_outputs(result, args.out, plots=not args.no_plots)
        log.info("wrote %d files to %s", len(written), args.out)
    if args.format == "json":
        print(json.dumps(result.to_json(), allow_nan=False))
    else:
        print(format_table(result))
    return EXIT_OK if result.metrics is not None else EXIT_NO_METRICS


# --- train ------------------------------------------------------------------

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
    "patience": (int, "early stopping: epochs without validation-AUC gain"),
    "width": (int, "channels of the first ResNet stage"),
    "blocks": (str, "residual blocks per stage, comma-separated"),
    "dropout": (float, "dropout before the classifier"),
    "input_size": (int, "side of the square network input"),
    "target_sensitivity": (float, "operating threshold: sensitivity on validation"),
    "ood_quantile": (float, "not-a-chest guard: quantile of validation OOD scores"),
    "ood_margin": (float, "not-a-chest guard: factor on that quantile"),
    "limit": (int, ">0: only this many images per class (smoke runs)"),
    "max_minutes": (float, ">0: start no new epoch after this many minutes"),
    "resume": (bool, "resume from the last checkpoint in --work-dir"),
    "device": (str, "torch device ('' = CUDA when present, else CPU)"),
    "threads": (int, "torch CPU threads (0 = torch default)"),
    "progress": (bool, "show a progress bar"),
}


def _register_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the pneumonia CNN (reproducible, resumable, early stopping)",
        description=(
            "Train, calibrate and export the model. Defaults are the shipped model's recipe "
            "(model.train.TrainConfig). Rerunning the same command after an interruption "
            "resumes from the last checkpoint in --work-dir."
        ),
    )
    for name, (kind, help_text) in TRAIN_OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_text)
        else:
            p.add_argument(flag, dest=name, type=kind, default=argparse.SUPPRESS,
                           metavar=name.upper(), help=help_text)
    p.set_defaults(func=run_train)


def train_config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig keyword arguments the user gave (absent ones keep their defaults)."""
    return {name: getattr(args, name) for name in TRAIN_OPTIONS if hasattr(args, name)}


def run_train(args: argparse.Namespace) -> int:
    from model.train import TrainConfig, run_training

    try:
        config = TrainConfig(**train_config_kwargs(args))
    except (TypeError, ValueError) as exc:
        print(f"pneumo train: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        weights = run_training(config)
    except KeyboardInterrupt:
        print("pneumo train: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (OSError, ValueError) as exc:
        print(f"pneumo train: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(weights)
    return EXIT_OK
