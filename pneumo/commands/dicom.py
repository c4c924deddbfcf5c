"""``pneumo send PATH... --to AE@HOST:PORT``: C-STORE files or folders to a PACS."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=_send)


def _send(args: argparse.Namespace) -> int:
    from dicom_io.config import Destination
    from dicom_io.send import expand_paths, send_files
    from pneumo.settings import load_settings

    settings = load_settings()
    try:
        destinations = (
            [Destination.parse(t) for t in args.to] if args.to else list(settings.destinations)
        )
    except ValueError as exc:
        print(f"pneumo send: {exc}", file=sys.stderr)
        return 2
    if not destinations:
        print("pneumo send: no destination (use --to AE@HOST:PORT)", file=sys.stderr)
        return 2
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        print(f"pneumo send: {len(missing)} path(s) do not exist: {missing[0]}", file=sys.stderr)
        return 2
    if not expand_paths(args.paths):
        print("pneumo send: no files found", file=sys.stderr)
        return 2
    exit_code = 0
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
            exit_code = 1
    return exit_code
