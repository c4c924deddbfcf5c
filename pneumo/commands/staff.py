"""Commands for radiology staff and their administrators: ``api``, ``tokens``, ``audit``,
``feedback`` and the staff-grade ``results`` search.

``results`` is :func:`cmd_results` with :func:`add_results_arguments`; it runs the
same query (:func:`db.queries.search_studies`) as ``GET /api/studies``;
``results --history`` lists every result of the studies it finds
(:func:`db.queries.study_history`). Reads of
patient data from here are audited as the operating-system user, role empty,
client ``cli``.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import json
import sys
from collections.abc import Sequence
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from pneumo.exit_codes import ExitCode

if TYPE_CHECKING:
    from pneumo.settings import Settings

__all__ = [
    "add_results_arguments",
    "cmd_api",
    "cmd_audit",
    "cmd_feedback_export",
    "cmd_results",
    "cmd_tokens_create",
    "cmd_tokens_list",
    "cmd_tokens_revoke",
    "register",
    "results_filter",
]

CLI_CLIENT = "cli"


def register(subparsers: Any) -> None:
    """Add ``results``, ``api``, ``tokens``, ``audit`` and ``feedback``."""
    from db.access import Role

    results = subparsers.add_parser(
        "results", help="find studies and their newest result (filters as in the API)"
    )
    add_results_arguments(results)
    results.set_defaults(func=cmd_results)

    api = subparsers.add_parser("api", help="serve the staff REST API and worklist page")
    api.add_argument("--host", default=None, help="default: PNEUMO_API_HOST (127.0.0.1)")
    api.add_argument("--port", type=int, default=None, help="default: PNEUMO_API_PORT (8000)")
    api.set_defaults(func=cmd_api)

    tokens = subparsers.add_parser("tokens", help="API tokens of staff (create, list, revoke)")
    tokens_sub = tokens.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    create = tokens_sub.add_parser("create", help="make a token; it is printed once")
    create.add_argument("--user", required=True)
    create.add_argument("--role", required=True, choices=[r.value for r in Role])
    create.set_defaults(func=cmd_tokens_create)
    listing = tokens_sub.add_parser("list", help="tokens (never the secrets)")
    listing.add_argument("--format", choices=("table", "json"), default="table")
    listing.set_defaults(func=cmd_tokens_list)
    revoke = tokens_sub.add_parser("revoke", help="revoke a token by its id")
    revoke.add_argument("token_id", type=int, metavar="ID")
    revoke.set_defaults(func=cmd_tokens_revoke)

    audit = subparsers.add_parser("audit", help="who read or changed which study, when")
    audit.add_argument("--user", default=None)
    audit.add_argument("--study-uid", default=None)
    audit.add_argument("--since", type=_datetime_arg, default=None, help="ISO date or date-time")
    audit.add_argument("--limit", type=int, default=1000)
    audit.add_argument("--format", choices=("table", "json"), default="table")
    audit.set_defaults(func=cmd_audit)

    feedback = subparsers.add_parser("feedback", help="radiologists' feedback on results")
    feedback_sub = feedback.add_subparsers(dest="feedback_command", required=True, metavar="ACTION")
    export = feedback_sub.add_parser("export", help="every feedback row")
    export.add_argument("--format", choices=("csv", "json"), default="csv")
    export.set_defaults(func=cmd_feedback_export)


def _datetime_arg(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO date or date-time: {value!r}") from exc


def _date_arg(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO date (YYYY-MM-DD): {value!r}") from exc


def _probability_arg(value: str) -> float:
    try:
        p = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from exc
    if not 0.0 <= p <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return p


def _cli_user() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no login name (containers): still say where it came from
        return "cli:unknown"


# --- api ------------------------------------------------------------------------------


def api_address(settings: Settings, host: str | None, port: int | None) -> tuple[str, int]:
    """Where ``pneumo api`` binds: the arguments, else the settings."""
    return (host or settings.api_host, settings.api_port if port is None else port)


def cmd_api(args: argparse.Namespace) -> int:
    """Serve the API and worklist page until interrupted."""
    import uvicorn

    from pneumo.api.app import create_app
    from pneumo.settings import load_settings

    settings = load_settings()
    host, port = api_address(settings, args.host, args.port)
    # uvicorn's access log would print query strings, which hold patient IDs.
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        access_log=False,
        log_level="info",
        log_config=None,  # our logging setup (text or JSON, PNEUMO_LOG_FORMAT) applies
    )
    return ExitCode.OK


# --- tokens ---------------------------------------------------------------------------


def cmd_tokens_create(args: argparse.Namespace) -> int:
    """Create a token and print it once; it cannot be shown again."""
    from db import access
    from db.engine import session_scope
    from pneumo.settings import load_settings

    settings = load_settings()
    try:
        with session_scope(settings.effective_database_url) as session:
            token_id, token = access.create_token(
                session, user=args.user, role=access.Role(args.role)
            )
            access.record_audit(
                session, user=_cli_user(), role=None, action=access.AuditAction.CREATE_TOKEN,
                client=CLI_CLIENT,
            )  # fmt: skip
    except ValueError as exc:
        print(f"pneumo tokens create: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    print(token)
    print(
        f"token {token_id} for {args.user} ({args.role}); shown once, keep it secret",
        file=sys.stderr,
    )
    return ExitCode.OK


def cmd_tokens_list(args: argparse.Namespace) -> int:
    from db import access
    from db.engine import session_scope
    from pneumo.settings import load_settings

    settings = load_settings()
    with session_scope(settings.effective_database_url) as session:
        rows = access.list_tokens(session)
    listing = [
        {
            "id": r.id,
            "user": r.user,
            "role": r.role.value,
            "created_at": r.created_at.isoformat(timespec="seconds"),
            "revoked_at": ""
            if r.revoked_at is None
            else r.revoked_at.isoformat(timespec="seconds"),
        }
        for r in rows
    ]
    if args.format == "json":
        print(json.dumps(listing, indent=2))
    elif listing:
        print(format_table(listing))
    else:
        print("no tokens")
    return ExitCode.OK


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    """Revoke a token; FAILED when no active token has that id."""
    from db import access
    from db.engine import session_scope
    from pneumo.settings import load_settings

    settings = load_settings()
    with session_scope(settings.effective_database_url) as session:
        done = access.revoke_token(session, args.token_id)
        if done:
            access.record_audit(
                session, user=_cli_user(), role=None, action=access.AuditAction.REVOKE_TOKEN,
                client=CLI_CLIENT,
            )  # fmt: skip
    if not done:
        print(f"pneumo tokens revoke: no active token {args.token_id}", file=sys.stderr)
        return ExitCode.FAILED
    print(f"token {args.token_id} revoked")
    return ExitCode.OK


# --- audit and feedback -----------------------------------------------------------------


def cmd_audit(args: argparse.Namespace) -> int:
    from db import access
    from db.engine import session_scope
    from pneumo.settings import load_settings

    settings = load_settings()
    with session_scope(settings.effective_database_url) as session:
        rows = access.audit_events(
            session, user=args.user, study_uid=args.study_uid, since=args.since, limit=args.limit
        )
    listing = [r.as_dict() for r in rows]
    if args.format == "json":
        print(json.dumps(listing, indent=2))
    elif listing:
        print(format_table([{k: "" if v is None else v for k, v in r.items()} for r in listing]))
    else:
        print("no audit events")
    return ExitCode.OK


FEEDBACK_COLUMNS = (
    "study_uid", "revision", "result_id", "agreement", "final_label", "user", "role", "created_at",
)  # fmt: skip


def cmd_feedback_export(args: argparse.Namespace) -> int:
    """Every feedback row as CSV (or JSON) on standard output."""
    from db import access
    from db.engine import session_scope
    from pneumo.settings import load_settings

    settings = load_settings()
    with session_scope(settings.effective_database_url) as session:
        rows = [r.as_dict() for r in access.feedback_rows(session)]
        access.record_audit(
            session, user=_cli_user(), role=None, action=access.AuditAction.EXPORT_FEEDBACK,
            client=CLI_CLIENT,
        )  # fmt: skip
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return ExitCode.OK
    writer = csv.DictWriter(sys.stdout, fieldnames=FEEDBACK_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return ExitCode.OK


# --- results --------------------------------------------------------------------------


def add_results_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``results`` options: the staff search filters, sort, format, paging."""
    from db.models import StudyStatus
    from db.queries import DateField, Finding, Sort

    parser.add_argument("--study-uid", default=None)
    parser.add_argument("--patient-id", default=None)
    parser.add_argument("--accession", default=None)
    parser.add_argument("--since", type=_date_arg, default=None, help="YYYY-MM-DD, inclusive")
    parser.add_argument("--until", type=_date_arg, default=None, help="YYYY-MM-DD, inclusive")
    parser.add_argument(
        "--date-field",
        choices=[d.value for d in DateField],
        default=DateField.STUDY.value,
        help="which date --since/--until bound (default: the study date)",
    )
    parser.add_argument("--finding", choices=[f.value for f in Finding], default=None)
    parser.add_argument("--status", choices=[s.value for s in StudyStatus], default=None)
    parser.add_argument("--flag", default=None, help="e.g. outside-intended-use, not-chest-xray")
    parser.add_argument("--min-probability", type=_probability_arg, default=None)
    parser.add_argument("--model-version", default=None, help="1.0.0 or pneumonet-1.0.0")
    parser.add_argument("--sort", choices=[s.value for s in Sort], default=Sort.NEWEST.value)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--paths", action="store_true", help="add the SR file path column")
    parser.add_argument(
        "--history",
        action="store_true",
        help="every revision of each matching study, newest first (--limit counts studies)",
    )


def results_filter(args: argparse.Namespace) -> Any:
    """The :class:`db.queries.StudyFilter` the ``results`` options ask for.

    Raises:
        ValueError: a malformed UID or inconsistent bounds.
    """
    from db.models import StudyStatus
    from db.queries import DateField, Finding, StudyFilter
    from dicom_io.uids import require_uid

    return StudyFilter(
        study_uid=require_uid(args.study_uid, "--study-uid") if args.study_uid else None,
        patient_id=args.patient_id,
        accession=args.accession,
        since=args.since,
        until=args.until,
        date_field=DateField(args.date_field),
        finding=None if args.finding is None else Finding(args.finding),
        status=None if args.status is None else StudyStatus(args.status),
        flag=args.flag,
        min_probability=args.min_probability,
        model_version=args.model_version,
    )


def _result_line(r: Any, paths: bool) -> dict[str, Any]:
    return {
        "study_uid": r.study_uid,
        "patient_id": r.patient_id or "",
        "accession": r.accession_number or "",
        "study_date": "" if r.study_date is None else r.study_date.isoformat(),
        "status": r.study_status.value,
        "rev": r.revision,
        "finding": "-" if r.finding is None else ("PNEUMONIA" if r.finding else "none"),
        "probability": "-" if r.probability is None else f"{r.probability:.4f}",
        "threshold": "-" if r.threshold is None else f"{r.threshold:.4f}",
        "model": r.model or "-",
        "flags": ",".join(r.flags) or "-",
        "delivery": ",".join(f"{d}:{s}" for d, s in r.deliveries) or "-",
        **({"sr_file": r.sr_path or "-"} if paths else {}),
    }


def cmd_results(args: argparse.Namespace) -> int:
    """Print the studies matching the filters as a table, CSV or JSON."""
    from db import access
    from db.engine import session_scope
    from db.queries import MAX_PAGE_SIZE, Sort, search_studies, study_history
    from pneumo.settings import load_settings

    try:
        filters = results_filter(args)
    except ValueError as exc:
        print(f"pneumo results: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    if not 1 <= args.limit <= MAX_PAGE_SIZE:
        print(f"pneumo results: --limit must be between 1 and {MAX_PAGE_SIZE}", file=sys.stderr)
        return ExitCode.USAGE
    settings = load_settings()
    history = getattr(args, "history", False)
    with session_scope(settings.effective_database_url) as session:
        if history:  # every result of each matching study, newest revision first
            rows: Sequence[Any] = study_history(
                session, filters, sort=Sort(args.sort), limit=args.limit
            )
        else:
            rows = search_studies(session, filters, sort=Sort(args.sort), limit=args.limit).rows
        access.record_audit(
            session, user=_cli_user(), role=None, action=access.AuditAction.LIST_STUDIES,
            study_uid=filters.study_uid, client=CLI_CLIENT,
        )  # fmt: skip
    lines = [_history_line(r) if history else _result_line(r, args.paths) for r in rows]
    return _print_rows(args.format, rows, lines)


def _print_rows(fmt: str, rows: Sequence[Any], lines: list[dict[str, Any]]) -> int:
    """``rows`` as JSON (their ``as_dict``), or their ``lines`` as CSV or a table."""
    if fmt == "json":
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return ExitCode.OK
    if fmt == "csv":
        columns = list(lines[0]) if lines else ["study_uid"]
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(lines)
        return ExitCode.OK
    print(format_table(lines) if lines else "no results")
    return ExitCode.OK


def _history_line(r: Any) -> dict[str, Any]:
    return {
        "study_uid": r.study_uid,
        "patient_id": r.patient_id or "",
        "accession": r.accession_number or "",
        "rev": r.revision,
        "model": r.model,
        "finding": "-" if r.finding is None else ("PNEUMONIA" if r.finding else "none"),
        "probability": "-" if r.probability is None else f"{r.probability:.4f}",
        "flags": ",".join(r.flags) or "-",
        "created": r.created_at.isoformat(timespec="seconds"),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """Left-aligned columns named by the first row's keys."""
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines.append("  ".join("-" * widths[c] for c in columns))
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
