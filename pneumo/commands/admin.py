"""Commands for operators and staff: ``reprocess``, ``db upgrade``, ``status``, ``results``, ``send``.

Each runs once and exits with a :class:`~pneumo.exit_codes.ExitCode`. In the
embedded default, those that need the broker (``reprocess``, ``status``) start
the private ``redis-server`` for their own use when none runs, and stop it
again; the messages they publish are kept in its append-only file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumo.commands._common import quiet_libraries
from pneumo.exit_codes import ExitCode

if TYPE_CHECKING:
    from pneumo.settings import Settings

__all__ = ["cmd_db_upgrade", "cmd_reprocess", "cmd_results", "cmd_send", "cmd_status", "register"]

log = logging.getLogger("pneumo")


def register(subparsers: Any) -> None:
    """Add ``reprocess``, ``db``, ``status``, ``results`` and ``send``."""
    reprocess = subparsers.add_parser(
        "reprocess", help="queue stored studies again on the batch queue (e.g. new model)"
    )
    reprocess.add_argument(
        "--study-uid", action="append", required=True, help="repeat for several studies"
    )
    reprocess.set_defaults(func=cmd_reprocess)

    db = subparsers.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_sub.add_parser("upgrade", help="apply migrations up to the newest")
    upgrade.set_defaults(func=cmd_db_upgrade)

    status = subparsers.add_parser("status", help="queue depths, studies by status, recent errors")
    status.add_argument("--format", choices=("table", "json"), default="table")
    status.set_defaults(func=cmd_status)

    results = subparsers.add_parser("results", help="recent results")
    results.add_argument("--study-uid", default=None)
    results.add_argument("--limit", type=int, default=50)
    results.add_argument("--format", choices=("table", "json"), default="table")
    results.add_argument("--paths", action="store_true", help="add the SR file path column")
    results.set_defaults(func=cmd_results)

    _register_send(subparsers)


@contextmanager
def _broker_for_this_command(settings: Settings) -> Iterator[None]:
    """The embedded broker while the command runs (stopped after only if started here)."""
    from worker import embedded_broker

    if not settings.uses_embedded_broker:
        yield
        return
    with embedded_broker.running(settings.data_dir):
        yield


# --- db -------------------------------------------------------------------------


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Apply the database migrations up to the newest."""
    from db.migrate import upgrade
    from pneumo.settings import load_settings

    quiet_libraries(args)
    settings = load_settings()
    upgrade(settings.effective_database_url)
    print("database is at the newest schema")
    return ExitCode.OK


# --- reprocess --------------------------------------------------------------------


def cmd_reprocess(args: argparse.Namespace) -> int:
    """Queue stored studies again on the batch queue; FAILED when any was not queued."""
    from dicom_io.uids import require_uid
    from pneumo.celery_app import build_app
    from pneumo.settings import load_settings
    from worker.intake import Intake

    settings = load_settings()
    intake = Intake(config=settings.worker_config(), app=build_app(settings))
    code = ExitCode.OK
    with _broker_for_this_command(settings):
        for uid in args.study_uid:
            try:
                intake.reprocess(require_uid(uid, "--study-uid"))
                print(f"queued on batch: {uid}")
            except (LookupError, ValueError) as exc:
                print(f"not queued: {uid}: {exc}", file=sys.stderr)
                code = ExitCode.FAILED
    return code


# --- status and results -------------------------------------------------------------


def _queue_depths(settings: Settings) -> dict[str, int | None]:
    from pneumo.celery_app import build_app
    from worker.app import queue_depths
    from worker.queues import QUEUE_PRIORITY

    try:
        with _broker_for_this_command(settings):
            return queue_depths(build_app(settings))
    except Exception as exc:
        log.warning("broker unreachable: %s", type(exc).__name__)
        return {name.value: None for name in QUEUE_PRIORITY}


def cmd_status(args: argparse.Namespace) -> int:
    """Print queue depths, studies by status and recent errors."""
    from db import repository as repo
    from db.engine import session_scope
    from pneumo.settings import load_settings

    settings = load_settings()
    depths = _queue_depths(settings)
    with session_scope(settings.effective_database_url) as session:
        counts = repo.studies_by_status(session)
        errors = repo.recent_errors(session)
    if args.format == "json":
        listing = [
            {"study_uid": e.study_uid, "kind": e.kind, "status": e.status,
             "attempt": e.attempt, "error": e.error, "at": e.at.isoformat()}
            for e in errors
        ]  # fmt: skip
        print(json.dumps({"queues": depths, "studies": counts, "errors": listing}, indent=2))
        return ExitCode.OK
    print("queues:  " + "  ".join(f"{k}={'?' if v is None else v}" for k, v in depths.items()))
    print("studies: " + ("  ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"))
    if errors:
        print("recent errors:")
        for e in errors:
            print(
                f"  {e.at:%Y-%m-%d %H:%M:%S}  {e.study_uid}  {e.kind}#{e.attempt} "
                f"{e.status}: {e.error}"
            )
    else:
        print("recent errors: none")
    return ExitCode.OK


def _format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines.append("  ".join("-" * widths[c] for c in columns))
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def cmd_results(args: argparse.Namespace) -> int:
    """Print recent results as a table or JSON."""
    from db import repository as repo
    from db.engine import session_scope
    from dicom_io.uids import require_uid
    from pneumo.settings import load_settings

    settings = load_settings()
    study_uid = require_uid(args.study_uid, "--study-uid") if args.study_uid else None
    with session_scope(settings.effective_database_url) as session:
        rows = repo.recent_results(session, study_uid=study_uid, limit=args.limit)
    if args.format == "json":
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return ExitCode.OK
    if not rows:
        print("no results")
        return ExitCode.OK
    table = [
        {
            "study_uid": r.study_uid,
            "accession": r.accession_number or "",
            "status": r.study_status,
            "rev": r.revision,
            "finding": "-" if r.finding is None else ("PNEUMONIA" if r.finding else "none"),
            "probability": "-" if r.probability is None else f"{r.probability:.4f}",
            "model": r.model,
            "flags": ",".join(r.flags) or "-",
            "delivery": ",".join(f"{d}:{s}" for d, s in r.deliveries) or "-",
            **({"sr_file": r.sr_path or "-"} if args.paths else {}),
        }
        for r in rows
    ]
    print(_format_table(table, list(table[0])))
    return ExitCode.OK


# --- send ---------------------------------------------------------------------------


def _register_send(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "send",
        help="send DICOM files or folders to a peer (C-STORE)",
        description="Send DICOM files (or every file under folders) by C-STORE, "
        "retrying failures with backoff. Nothing is deleted.",
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument(
        "--to",
        action="append",
        metavar="AE@HOST:PORT",
        help="destination (repeatable); default: PNEUMO_DESTINATIONS",
    )
    p.add_argument("--calling-ae", help="our AE title (default: PNEUMO_AE_TITLE)")
    p.add_argument("--retries", type=int, help="default: PNEUMO_SEND_RETRIES")
    p.add_argument("--backoff", type=float, help="first backoff in seconds")
    p.set_defaults(func=cmd_send)


def _usage_error(message: str) -> int:
    print(f"pneumo send: {message}", file=sys.stderr)
    return ExitCode.USAGE


def cmd_send(args: argparse.Namespace) -> int:
    """C-STORE the files to each destination; USAGE on bad input, FAILED when a send failed."""
    from dicom_io.config import Destination
    from dicom_io.send import expand_paths, send_files
    from pneumo.settings import load_settings

    settings = load_settings()
    try:
        destinations = (
            [Destination.parse(t) for t in args.to] if args.to else list(settings.destinations)
        )
    except ValueError as exc:
        return _usage_error(str(exc))
    if not destinations:
        return _usage_error("no destination (use --to AE@HOST:PORT)")
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        return _usage_error(f"{len(missing)} path(s) do not exist: {missing[0]}")
    if not expand_paths(args.paths):
        return _usage_error("no files found")
    code = ExitCode.OK
    for dest in destinations:
        result = send_files(
            args.paths,
            dest,
            calling_ae=args.calling_ae or settings.ae_title,
            retries=settings.send_retries if args.retries is None else args.retries,
            backoff_seconds=settings.send_backoff_seconds if args.backoff is None else args.backoff,
            tls=settings.tls_config(),
        )
        print(
            f"{dest}: sent {len(result.sent)}, failed {len(result.failed)}, "
            f"attempts {result.attempts}"
        )
        for path, reason in result.failed:
            print(f"  FAILED {path}: {reason}", file=sys.stderr)
        if not result.ok:
            code = ExitCode.FAILED
    return code
