"""Commands for operators: ``db upgrade``, ``status``, ``send``, ``purge``.

Each runs once and exits with a :class:`~pneumo.exit_codes.ExitCode`. In the
embedded default, those that need the broker (``status``; ``reprocess`` in
:mod:`pneumo.commands.operator`) start
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

__all__ = [
    "cmd_db_upgrade",
    "cmd_purge",
    "cmd_send",
    "cmd_status",
    "register",
]

log = logging.getLogger("pneumo")


def register(subparsers: Any) -> None:
    """Add ``db``, ``status``, ``purge`` and ``send``."""
    db = subparsers.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_sub.add_parser("upgrade", help="apply migrations up to the newest")
    upgrade.set_defaults(func=cmd_db_upgrade)

    status = subparsers.add_parser(
        "status",
        help="live workers, queue depths, studies by status, failed deliveries, recent errors",
    )
    status.add_argument("--format", choices=("table", "json"), default="table")
    status.set_defaults(func=cmd_status)

    purge = subparsers.add_parser(
        "purge",
        help="delete spooled pixels of finished studies (retention)",
        description="Delete the spooled DICOM files of studies that are done or "
        "dead-lettered and were received more than DAYS ago. Result rows, result "
        "files and the audit trail are kept; the studies cannot be reprocessed after.",
    )
    purge.add_argument("--older-than", type=float, required=True, metavar="DAYS")
    purge.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    purge.set_defaults(func=cmd_purge)

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


# --- retention ----------------------------------------------------------------------


def cmd_purge(args: argparse.Namespace) -> int:
    """Delete spooled pixels of old finished studies; USAGE for a negative DAYS."""
    from pneumo.settings import load_settings
    from worker.retention import purge_spool

    quiet_libraries(args)
    if args.older_than < 0:
        print("pneumo purge: --older-than must be >= 0 days", file=sys.stderr)
        return ExitCode.USAGE
    settings = load_settings()
    report = purge_spool(
        settings.effective_database_url,
        settings.spool_dir,
        older_than_days=args.older_than,
        dry_run=args.dry_run,
    )
    verb = "would purge" if args.dry_run else "purged"
    print(
        f"{verb} {report.studies} study(ies): {report.instances_marked} instance(s), "
        f"{report.files_deleted} file(s) deleted"
    )
    return ExitCode.OK


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


def _status_summary(settings: Settings) -> dict[str, Any]:
    """Workers, studies, deliveries and recent errors, as the database says (no PHI)."""
    from datetime import timedelta

    from db import metrics
    from db import repository as repo
    from db.engine import session_scope

    stale_after = timedelta(seconds=settings.heartbeat_stale_seconds)
    with session_scope(settings.effective_database_url) as session:
        workers = metrics.worker_counts(session, stale_after=stale_after)
        deliveries = metrics.delivery_counts(session)
        return {
            "workers": {
                "live": workers.live,
                "stale": workers.stale,
                "running_tasks": workers.running_tasks,
                "names": list(workers.live_workers),
            },
            "studies": repo.studies_by_status(session),
            "deliveries": {
                d.destination: d.by_status | {"failed_attempts": d.failed_attempts}
                for d in deliveries
            },
            "errors": repo.recent_errors(session),
        }


def cmd_status(args: argparse.Namespace) -> int:
    """Print live workers, queue depths, studies by status, deliveries and recent errors."""
    from pneumo.settings import load_settings

    settings = load_settings()
    depths = _queue_depths(settings)
    summary = _status_summary(settings)
    errors = summary.pop("errors")
    if args.format == "json":
        listing = [
            {"study_uid": e.study_uid, "kind": e.kind, "status": e.status,
             "attempt": e.attempt, "error": e.error, "at": e.at.isoformat()}
            for e in errors
        ]  # fmt: skip
        print(json.dumps({"queues": depths, **summary, "errors": listing}, indent=2))
        return ExitCode.OK
    workers, counts = summary["workers"], summary["studies"]
    print(
        f"workers: live={workers['live']} stale={workers['stale']} "
        f"running={workers['running_tasks']}"
        + (f"  ({', '.join(workers['names'])})" if workers["names"] else "")
    )
    print("queues:  " + "  ".join(f"{k}={'?' if v is None else v}" for k, v in depths.items()))
    print("studies: " + ("  ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"))
    if summary["deliveries"]:
        print("deliveries:")
        for destination, by_status in summary["deliveries"].items():
            print(f"  {destination}  " + "  ".join(f"{k}={v}" for k, v in by_status.items()))
    else:
        print("deliveries: none")
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
