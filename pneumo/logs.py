"""Logging set-up for every ``pneumo`` command: plain text, or one JSON object per line.

``PNEUMO_LOG_FORMAT=json`` gives lines a log shipper can parse without a
pattern: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, and
``uids`` when the message's arguments include DICOM UIDs (PS3.5 §9.1), so a
study can be followed across listener and workers. The formatter adds no
field our code did not log: patient names, IDs and dates never appear because
no ``log.*`` call passes them (docs/SECURITY.md, "PHI in what operators read").
"""

from __future__ import annotations

import ipaddress
import json
import logging
from datetime import UTC, datetime
from typing import Any, Literal

from dicom_io.uids import is_valid_uid

__all__ = ["JsonFormatter", "TEXT_FORMAT", "configure_logging"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes set via ``extra=`` that name a UID, copied into the JSON object as is.
_UID_FIELDS = ("study_uid", "series_uid", "sop_instance_uid")


def _is_uid(value: object) -> bool:
    # A bare number (a port, a count) and a dotted IPv4 address also follow the grammar.
    if not (isinstance(value, str) and "." in value and is_valid_uid(value)):
        return False
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return True
    return False


def _uids_in(args: Any) -> list[str]:
    values = args.values() if isinstance(args, dict) else args if isinstance(args, tuple) else ()
    return [v for v in values if _is_uid(v)]


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, uids, process, thread, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        uids = _uids_in(record.args)
        for name in _UID_FIELDS:
            value = getattr(record, name, None)
            if isinstance(value, str):
                entry[name] = value
        if uids:
            entry["uids"] = uids
        entry["process"] = record.process
        entry["thread"] = record.threadName
        if record.exc_info:
            entry["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(*, verbose: bool, log_format: Literal["text", "json"] = "text") -> None:
    """Configure the root logger once for a ``pneumo`` process (DEBUG with ``verbose``)."""
    level = logging.DEBUG if verbose else logging.INFO
    if log_format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=level, handlers=[handler], force=True)
    else:
        logging.basicConfig(level=level, format=TEXT_FORMAT)
