"""The single ``pneumo`` command-line entry point.

A thin face over the packages: every sub-command lives in ``pneumo.commands``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["build_parser", "main"]

# Sub-command modules, in the order their commands are listed in ``--help``.
_COMMAND_MODULES = (
    "pneumo.commands.service",  # up, listen, worker
    "pneumo.commands.admin",  # db, status, send, purge
    "pneumo.commands.model",  # train, evaluate
    "pneumo.commands.staff",  # results, api, tokens, audit, feedback
    "pneumo.commands.operator",  # reprocess, batches, models
    "pneumo.commands.health",  # ping (listener, worker, api): health checks
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pneumo", description="Pneumonia detection worker beside a PACS."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency, not an absent module
                raise
            continue
        module.register(subparsers)
    return parser


def _keep_phi_out_of_logs() -> None:
    """Stop pydicom quoting element values in its validation warnings.

    Those warnings go to the ``pydicom`` logger and can quote a Patient's Name;
    received data is validated where it matters (UIDs, selection) instead.
    """
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def main(argv: list[str] | None = None) -> int:
    _keep_phi_out_of_logs()
    parser = build_parser()
    args = parser.parse_args(argv)
    from pneumo.logs import configure_logging

    try:
        from pneumo.settings import load_settings

        log_format = load_settings().log_format
    except Exception:  # invalid settings: the command itself reports them
        log_format = "text"
    configure_logging(verbose=args.verbose, log_format=log_format)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
