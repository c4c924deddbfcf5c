"""Commands for operators rerunning studies: ``reprocess``, ``batches``, ``models``, ``diff``.

``reprocess`` selects stored studies (selectors combine with AND), records a
batch (:mod:`db.batches`) and publishes it on the ``batch`` queue
(:mod:`worker.batches`); realtime work keeps priority. Without ``--wait`` it
prints the batch id and returns: the workers' reconcilers publish the rest,
at the batch's ``--max-rate``. ``diff`` compares two model versions on the
studies both scored (:func:`db.diff.version_diff`); this module only formats it.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumo.commands.staff import _cli_user, _date_arg, format_table
from pneumo.exit_codes import ExitCode

if TYPE_CHECKING:
    from db.batches import BatchView, Selector

__all__ = [
    "cmd_batches_cancel",
    "cmd_batches_list",
    "cmd_batches_retry",
    "cmd_batches_show",
    "cmd_diff",
    "cmd_models_activate",
    "cmd_models_list",
    "cmd_reprocess",
    "register",
]

SAMPLE_ROWS = 10
"""Studies a dry run lists."""


def register(subparsers: Any) -> None:
    """Add ``reprocess``, ``batches``, ``models`` and ``diff``."""
    _register_reprocess(subparsers)
    _register_batches(subparsers)
    _register_diff(subparsers)
    models = subparsers.add_parser("models", help="model versions known to the database")
    models.add_argument("--format", choices=("table", "json"), default="table")
    models.set_defaults(func=cmd_models_list)
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION")
    models_sub.add_parser("list", help="versions with sha256, threshold, active flag (default)")
    activate = models_sub.add_parser(
        "activate",
        help="make a model version the one new work uses",
        description="Make a model version the one new work uses (workers pick it up at their "
        "next study). VERSION (1.0.0 or pneumonet-1.0.0) must be known to the database and "
        "its weights file findable; PATH registers a weights file (name, version, threshold "
        "and sha256 read from it) and activates it. Workers started with PNEUMO_MODEL_PATH "
        "keep using that file.",
    )
    activate.add_argument("target", metavar="VERSION|PATH")
    activate.set_defaults(func=cmd_models_activate)


def _rate_arg(value: str) -> float:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(/s)?\s*", value)
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError("expected a positive rate, e.g. 5/s")
    return float(match.group(1))


def _register_reprocess(subparsers: Any) -> None:
    from db.batches import StatusChoice
    from db.queries import DateField, Finding

    p = subparsers.add_parser(
        "reprocess",
        help="rerun stored studies as a batch on the batch queue (e.g. new model)",
        description="Select stored studies (criteria combine: every one must hold), record "
        "a batch and queue one new revision per study on the batch queue.",
    )
    p.add_argument("--study-uid", action="append", default=[], help="repeatable")
    p.add_argument("--studies-file", type=Path, help="one Study Instance UID per line")
    p.add_argument("--since", type=_date_arg, help="YYYY-MM-DD, inclusive")
    p.add_argument("--until", type=_date_arg, help="YYYY-MM-DD, inclusive")
    p.add_argument("--date-field", choices=[d.value for d in DateField],
                   default=DateField.STUDY.value, help="which date --since/--until bound")  # fmt: skip
    p.add_argument("--status", choices=[s.value for s in StatusChoice])
    p.add_argument("--finding", choices=[f.value for f in Finding])
    p.add_argument("--flag", help="e.g. outside-intended-use, not-chest-xray")
    p.add_argument(
        "--model-version",
        metavar="V",
        help="studies whose newest result was made by another model than V",
    )
    p.add_argument("--all", action="store_true", dest="everything", help="every stored study")
    p.add_argument("--dry-run", action="store_true", help="print the count and a sample only")
    p.add_argument("--wait", action="store_true", help="follow the batch with a progress bar")
    p.add_argument("--max-rate", type=_rate_arg, metavar="N/s", help="publish at most N per s")
    p.set_defaults(func=cmd_reprocess)


def _selector(args: argparse.Namespace) -> Selector:
    """The selector the options ask for.

    Raises:
        ValueError: a malformed UID, inconsistent dates, an unreadable studies file.
    """
    from db.batches import Selector, StatusChoice
    from db.queries import DateField, Finding
    from dicom_io.uids import require_uid

    uids = [require_uid(u.strip(), "--study-uid") for u in args.study_uid]
    if args.studies_file is not None:
        try:
            text = args.studies_file.read_text()
        except OSError as exc:
            raise ValueError(f"--studies-file: {exc.strerror}") from exc
        lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
        uids += [require_uid(line, "--studies-file") for line in lines if line]
        if not uids:
            raise ValueError("--studies-file: no Study Instance UID in it")
    return Selector(
        study_uids=tuple(dict.fromkeys(uids)),
        since=args.since,
        until=args.until,
        date_field=DateField(args.date_field),
        status=None if args.status is None else StatusChoice(args.status),
        finding=None if args.finding is None else Finding(args.finding),
        flag=args.flag,
        model_version=args.model_version,
        everything=args.everything,
    )


def _sample_line(row: Any) -> dict[str, Any]:
    return {
        "study_uid": row.study_uid,
        "study_date": "" if row.study_date is None else row.study_date.isoformat(),
        "status": row.study_status.value,
        "rev": row.revision,
        "finding": "-" if row.finding is None else ("PNEUMONIA" if row.finding else "none"),
        "probability": "-" if row.probability is None else f"{row.probability:.4f}",
        "model": row.model or "-",
    }


def _dry_run(settings: Any, selector: Selector) -> int:
    from db.batches import select_studies
    from db.engine import session_scope

    with session_scope(settings.effective_database_url) as session:
        selection = select_studies(session, selector, include_purged=settings.pacs is not None)
    print(f"would reprocess {len(selection.study_ids)} study(ies)")
    if selection.purged:
        print(
            f"left out: {len(selection.purged)} study(ies) whose pixels were purged "
            "(set PNEUMO_PACS to retrieve them)"
        )
    lines = [_sample_line(row) for row in selection.rows[:SAMPLE_ROWS]]
    if lines:
        print(format_table(lines))
        if len(selection.rows) > SAMPLE_ROWS:
            print(f"... and {len(selection.rows) - SAMPLE_ROWS} more")
    return ExitCode.OK


def cmd_reprocess(args: argparse.Namespace) -> int:
    """Record a batch and publish it; USAGE on bad selectors, UNAVAILABLE without a broker."""
    from pneumo.settings import load_settings

    try:
        selector = _selector(args)
        if selector.empty:
            raise ValueError("give a selector (--study-uid, --status, ...) or --all")
    except ValueError as exc:
        print(f"pneumo reprocess: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    settings = load_settings()
    if args.dry_run:
        return _dry_run(settings, selector)
    return _start(settings, selector, args)


def _start(settings: Any, selector: Selector, args: argparse.Namespace) -> int:
    from kombu.exceptions import OperationalError

    from pneumo.celery_app import build_app
    from pneumo.commands.admin import _broker_for_this_command
    from worker import batches

    config = settings.worker_config()
    started = batches.start_batch(
        config.database_url,
        selector,
        started_by=_cli_user(),
        max_rate=args.max_rate,
        include_purged=config.pacs is not None,  # the worker fetches them from the PACS
    )
    if started.purged:
        print(f"left out: {len(started.purged)} study(ies) whose pixels were purged",
              file=sys.stderr)  # fmt: skip
    publish = batches.celery_publish(build_app(settings))
    try:
        with _broker_for_this_command(settings):
            batches.pump_once(config, publish, batch_ids=[started.batch_id])
            if not args.wait:
                print(f"batch {started.batch_id}: {started.studies} study(ies) queued")
                return ExitCode.OK
            final = _follow(config, publish, started.batch_id, started.studies)
    except OperationalError as exc:
        print(f"pneumo reprocess: broker unreachable ({type(exc).__name__}); batch "
              f"{started.batch_id} is recorded and will be published by the workers",
              file=sys.stderr)  # fmt: skip
        return ExitCode.UNAVAILABLE
    print(_summary(final))
    return ExitCode.OK if final.counts["failed"] == 0 else ExitCode.FAILED


def _follow(config: Any, publish: Any, batch_id: int, total: int) -> BatchView:
    """Publish and follow the batch with a tqdm bar (done / failed / remaining, rate, ETA)."""
    from tqdm import tqdm

    from worker import batches

    with tqdm(total=total, desc=f"batch {batch_id}", unit="study") as bar:

        def progress(current: BatchView) -> None:
            finished = current.counts["done"] + current.counts["failed"]
            bar.set_postfix(
                done=current.counts["done"],
                failed=current.counts["failed"],
                remaining=current.counts["queued"],
                refresh=False,
            )
            bar.update(finished - bar.n)

        return batches.follow(config, publish, batch_id, on_progress=progress)


def _summary(view: BatchView) -> str:
    counts = "  ".join(f"{k}={v}" for k, v in view.counts.items())
    return f"batch {view.batch_id} {view.state.value}: {counts}"


# --- batches ----------------------------------------------------------------------


def _register_batches(subparsers: Any) -> None:
    p = subparsers.add_parser("batches", help="list, show, cancel or retry reprocessing batches")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_batches_list)
    sub = p.add_subparsers(dest="batches_command", metavar="ACTION")
    listing = sub.add_parser("list", help="batches, newest first (default)")
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(func=cmd_batches_list)
    for name, func, help_text in (
        ("show", cmd_batches_show, "one batch: selector, counts and its unfinished items"),
        ("cancel", cmd_batches_cancel, "drop the queued items; started ones finish"),
        ("retry", cmd_batches_retry, "queue the failed items again (a new revision each)"),
    ):
        action = sub.add_parser(name, help=help_text)
        action.add_argument("batch_id", type=int, metavar="ID")
        action.set_defaults(func=func)


def _line(view: BatchView) -> dict[str, Any]:
    c = view.counts
    return {
        "id": view.batch_id,
        "started_by": view.started_by,
        "created": f"{view.created_at:%Y-%m-%d %H:%M:%S}",
        "state": view.state.value,
        "total": view.total,
        "done": c["done"],
        "failed": c["failed"],
        "queued": c["queued"],
        "cancelled": c["cancelled"],
        "selector": json.dumps({k: v for k, v in view.selector.items() if v}),
    }


def _config() -> Any:
    from pneumo.settings import load_settings

    return load_settings().worker_config()


def cmd_batches_list(args: argparse.Namespace) -> int:
    """Print the batches, newest first."""
    from db.batches import batch_views
    from db.engine import session_scope

    with session_scope(_config().database_url) as session:
        views = batch_views(session, limit=getattr(args, "limit", 50))
    if getattr(args, "format", "table") == "json":
        print(json.dumps([v.as_dict() for v in views], indent=2))
    else:
        print(format_table([_line(v) for v in views]) if views else "no batches")
    return ExitCode.OK


def cmd_batches_show(args: argparse.Namespace) -> int:
    """Print one batch and its unfinished or failed items; FAILED when unknown."""
    from db.batches import BatchItemState, batch_items, batch_views
    from db.engine import session_scope

    with session_scope(_config().database_url) as session:
        views = batch_views(session, [args.batch_id])
        states = (BatchItemState.QUEUED, BatchItemState.FAILED)
        items = batch_items(session, args.batch_id, states=states) if views else []
    if not views:
        print(f"pneumo batches: no batch {args.batch_id}", file=sys.stderr)
        return ExitCode.FAILED
    if getattr(args, "format", "table") == "json":
        print(json.dumps(views[0].as_dict() | {"items": [i.as_dict() for i in items]}, indent=2))
        return ExitCode.OK
    print(format_table([_line(views[0])]))
    if items:
        print(format_table([
            {"study_uid": i.study_uid, "rev": i.revision or "-", "state": i.state.value,
             "error": i.error or "-"} for i in items
        ]))  # fmt: skip
    return ExitCode.OK


def cmd_batches_cancel(args: argparse.Namespace) -> int:
    """Cancel a batch; FAILED when unknown."""
    from worker import batches

    report = batches.cancel(_config(), args.batch_id)
    if not report.found:
        print(f"pneumo batches: no batch {args.batch_id}", file=sys.stderr)
        return ExitCode.FAILED
    print(f"batch {args.batch_id} cancelled: {report.dropped} item(s) dropped, "
          f"{report.running} already started will finish")  # fmt: skip
    return ExitCode.OK


def cmd_batches_retry(args: argparse.Namespace) -> int:
    """Queue a batch's failed items again; the workers publish them. FAILED when unknown."""
    from worker import batches

    count = batches.retry(_config(), args.batch_id)
    if count is None:
        print(f"pneumo batches: no batch {args.batch_id}", file=sys.stderr)
        return ExitCode.FAILED
    print(f"batch {args.batch_id}: {count} failed item(s) queued again")
    return ExitCode.OK


# --- models -----------------------------------------------------------------------


def cmd_models_list(args: argparse.Namespace) -> int:
    """Print the model versions known to the database; ``active`` marks the one new work uses.

    That is the activated model (:mod:`db.models_registry`); with no activation,
    the shipped weights, matched by sha256. ``PNEUMO_MODEL_PATH`` set here is
    reported as pinning the workers started with it.
    """
    from db.engine import session_scope
    from db.models_registry import active_model
    from db.queries import model_versions
    from model.inference import default_weights_path, sha256_file
    from pneumo.settings import load_settings

    settings = load_settings()
    with session_scope(settings.effective_database_url) as session:
        models = model_versions(session)
        active = active_model(session)
    if active is not None:
        key: tuple[str, ...] | None = (active.name, active.version, active.sha256)
        source = f"{active.label} from {active.path} (activated by {active.activated_by} " \
                 f"at {active.activated_at:%Y-%m-%d %H:%M:%S})"  # fmt: skip
    else:
        shipped = default_weights_path()
        sha = sha256_file(shipped) if shipped.is_file() else None
        key = None if sha is None else (sha,)
        source = f"none activated: the shipped weights {shipped} (sha256 {sha or 'missing'})"
    rows = [
        m.as_dict() | {"label": m.label,
                       "active": key in ((m.name, m.version, m.sha256), (m.sha256,))}
        for m in models
    ]  # fmt: skip
    pinned = None if settings.model_path is None else str(settings.model_path)
    if args.format == "json":
        document = {
            "active": None if active is None else _active_dict(active),
            "pinned_by_model_path": pinned,
            "models": rows,
        }
        print(json.dumps(document, indent=2))
        return ExitCode.OK
    print(f"active model: {source}")
    if pinned is not None:
        print(f"PNEUMO_MODEL_PATH={pinned} is set: workers started with it use that file")
    lines = [
        {"model": r["label"], "sha256": r["sha256"][:16], "threshold": f"{r['threshold']:.4f}",
         "active": "yes" if r["active"] else ""} for r in rows
    ]  # fmt: skip
    print(format_table(lines) if lines else "no model version is known yet")
    return ExitCode.OK


def _active_dict(active: Any) -> dict[str, Any]:
    return {
        "label": active.label,
        "name": active.name,
        "version": active.version,
        "sha256": active.sha256,
        "threshold": active.threshold,
        "path": active.path,
        "activated_by": active.activated_by,
        "activated_at": active.activated_at.isoformat(),
    }


def _is_path(target: str) -> bool:
    return Path(target).is_file() or "/" in target or target.endswith(".pt")


def cmd_models_activate(args: argparse.Namespace) -> int:
    """Activate a model version (by label) or a weights file (by path).

    USAGE for an unknown or ambiguous version, a version whose weights file
    cannot be found, a file that is not a pneumo weights file, or a file that
    claims a registered version with other contents.
    """
    from db.engine import session_scope
    from model.inference import WeightsError
    from pneumo.settings import load_settings

    settings = load_settings()
    try:
        with session_scope(settings.effective_database_url) as session:
            if _is_path(args.target):
                active = _activate_file(session, Path(args.target))
            else:
                active = _activate_version(session, args.target, settings.model_path)
    except (ValueError, WeightsError) as exc:  # UnknownVersion too
        print(f"pneumo models activate: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    print(f"active model: {active.label} (sha256 {active.sha256[:16]}) from {active.path}; "
          "workers use it from their next study")  # fmt: skip
    if settings.model_path is not None:
        print(f"note: PNEUMO_MODEL_PATH={settings.model_path} is set here: workers started "
              "with it keep using that file", file=sys.stderr)  # fmt: skip
    return ExitCode.OK


def _activate_file(session: Any, path: Path) -> Any:
    """Register the weights file at ``path`` (its own name, version, threshold, sha256), activate it.

    Raises:
        model.inference.WeightsError: not a loadable pneumo weights file.
        ValueError: another file is registered under the same name and version.
    """
    from db import repository as repo
    from db.diff import UnknownVersion
    from db.models_registry import activate, registered_versions
    from model.inference import Predictor

    path = path.expanduser().resolve()
    info = Predictor(path, device="cpu").info  # loads it: a file workers cannot load is refused
    try:
        clashing = [v for v in registered_versions(session, f"{info.name}-{info.version}")
                    if v.name == info.name and v.sha256 != info.sha256]  # fmt: skip
    except UnknownVersion:
        clashing = []
    if clashing:
        raise ValueError(
            f"{clashing[0].label} is already registered with sha256 {clashing[0].sha256[:16]}, "
            f"this file has {info.sha256[:16]}: give the new weights a new version"
        )
    version_id = repo.ensure_model_version(
        session,
        name=info.name,
        version=info.version,
        sha256=info.sha256,
        threshold=info.threshold,
        intended_population=info.intended_population,
        max_age_years=info.max_age_years,
    )
    return activate(session, version_id, str(path), _cli_user())


def _activate_version(session: Any, label: str, model_path: Path | None) -> Any:
    """Activate a registered version, from a weights file whose sha256 is the version's.

    Looked for: the files it was activated from before, ``PNEUMO_MODEL_PATH``,
    the shipped weights.

    Raises:
        db.diff.UnknownVersion: no version is called ``label``.
        ValueError: several files are registered under ``label``, or none of the
            places holds a file with its sha256.
    """
    from db.models_registry import activate, activation_paths, registered_versions
    from model.inference import WEIGHTS_DIR, sha256_file

    versions = registered_versions(session, label)
    if len({v.sha256 for v in versions}) > 1:
        listing = ", ".join(f"{v.label} sha256 {v.sha256[:16]}" for v in versions)
        raise ValueError(f"{label!r} names several weights files ({listing}): activate by PATH")
    version = versions[0]
    candidates = [Path(p) for p in activation_paths(session, version.model_version_id)]
    candidates += [model_path] if model_path is not None else []
    candidates += sorted(WEIGHTS_DIR.glob("*.pt"))
    for candidate in dict.fromkeys(candidates):
        if candidate.is_file() and sha256_file(candidate) == version.sha256:
            path = str(candidate.resolve())
            return activate(session, version.model_version_id, path, _cli_user())
    raise ValueError(
        f"no weights file with the sha256 of {version.label} ({version.sha256[:16]}) found "
        "where it was activated from, at PNEUMO_MODEL_PATH or among the shipped weights: "
        "activate it by PATH"
    )


# --- diff -------------------------------------------------------------------------


def _register_diff(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "diff",
        help="what model version B changed against A on the studies both scored",
        description="Over the studies both versions scored (each version's newest result): "
        "the studies whose finding changed, the shift of the probability (B - A) and, where "
        "a radiologist gave a final label, each version's sensitivity and specificity "
        "(other-finding counts as negative for pneumonia).",
    )
    p.add_argument("--from-version", required=True, metavar="A", help="1.0.0 or pneumonet-1.0.0")
    p.add_argument("--to-version", required=True, metavar="B", help="1.1.0 or pneumonet-1.1.0")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=cmd_diff)


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _finding(value: bool) -> str:
    return "PNEUMONIA" if value else "none"


def cmd_diff(args: argparse.Namespace) -> int:
    """Print the comparison of two model versions; USAGE for an unknown version."""
    from db.diff import MOVED_BY, version_diff
    from db.engine import session_scope
    from pneumo.settings import load_settings

    settings = load_settings()
    try:
        with session_scope(settings.effective_database_url) as session:
            diff = version_diff(session, args.from_version, args.to_version)
    except ValueError as exc:  # UnknownVersion too
        print(f"pneumo diff: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    if args.format == "json":
        print(json.dumps(diff.as_dict(), indent=2))
        return ExitCode.OK
    changed = [
        {"study_uid": c.study_uid, "from_finding": _finding(c.from_finding),
         "to_finding": _finding(c.to_finding), "from_probability": f"{c.from_probability:.4f}",
         "to_probability": f"{c.to_probability:.4f}"} for c in diff.changed
    ]  # fmt: skip
    if args.format == "csv":
        columns = ("study_uid", "from_finding", "to_finding", "from_probability", "to_probability")
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(changed)
        return ExitCode.OK
    print(f"{diff.from_version} -> {diff.to_version}: {diff.studies} study(ies) scored by both, "
          f"{len(diff.changed)} changed finding")  # fmt: skip
    print(f"probability shift (B - A): mean {_fraction(diff.mean_shift)}, median "
          f"{_fraction(diff.median_shift)}, moved by > {MOVED_BY}: {diff.moved} "
          f"({_fraction(diff.moved_share)})")  # fmt: skip
    accuracy = [
        {"model": label, "n": acc.n, "positives": acc.positives, "negatives": acc.negatives,
         "sensitivity": _fraction(acc.sensitivity), "specificity": _fraction(acc.specificity)}
        for label, acc in ((diff.from_version, diff.from_accuracy),
                           (diff.to_version, diff.to_accuracy))
    ]  # fmt: skip
    print("on studies with a radiologist's final label (other-finding = no pneumonia):")
    print(format_table(accuracy))
    print(format_table(changed) if changed else "no study changed finding")
    return ExitCode.OK
