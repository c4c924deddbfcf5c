"""The JSON log formatter: one parseable object per line, UIDs picked out, nothing added."""

from __future__ import annotations

import json
import logging

from pneumo.logs import JsonFormatter

STUDY = "1.2.826.0.1.3680043.8.498.12345"


def _format(msg: str, *args: object, exc: bool = False) -> dict:  # type: ignore[type-arg]
    record = logging.LogRecord("worker.intake", logging.WARNING, __file__, 1, msg, args, None)
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line  # one object per line, even with a traceback
    parsed: dict = json.loads(line)  # type: ignore[type-arg]
    return parsed


def test_fields_and_uids() -> None:
    entry = _format("study %s on %s:%d: %d instance(s)", STUDY, "10.0.0.5", 104, 3)
    assert entry["level"] == "WARNING" and entry["logger"] == "worker.intake"
    assert entry["message"] == f"study {STUDY} on 10.0.0.5:104: 3 instance(s)"
    assert entry["time"].endswith("+00:00")
    assert entry["uids"] == [STUDY]  # neither the address nor the numbers


def test_no_uids_field_without_uids_and_exceptions_by_type() -> None:
    entry = _format("nothing to see", exc=True)
    assert "uids" not in entry
    assert entry["exc_type"] == "ValueError"
