"""Header hygiene: values that must not break a build, a database row or a log line.

Received headers are not trusted. Two kinds of defect break things downstream
and are repaired here, each recorded as a :class:`HeaderFix` (a code, never
the value):

* an invalid DA (PS3.5 Table 6.2-1: ``YYYYMMDD``, a real calendar date) or
  TM (``HH[MM[SS[.F{1,6}]]]``) value, e.g. ``19800231`` or ``1980-01-02``,
  is blanked: those attributes are Type 2 or 3 where they matter (Patient's
  Birth Date, Study Date/Time, PS3.3 §C.7.1.1, §C.7.2.1), so empty is a valid
  "unknown", whereas a wrong date would fail the SR build on every retry;
* NUL characters are stripped from text values (Patient ID, Accession
  Number...): PostgreSQL refuses them in text columns, and only UI values
  may be NUL-padded (PS3.5 §6.2).

Only top-level elements are repaired (the patient, study and series
attributes live there). Elements are *replaced*, never mutated, so sanitising
a shallow copy (:func:`sanitized_copy`) leaves the caller's data set intact.

:func:`redact_library_logs` keeps pydicom's "invalid value" log lines, which
quote the value, out of our logs.
"""

from __future__ import annotations

import datetime
import logging
import re
import warnings
from dataclasses import dataclass
from enum import Enum

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

__all__ = [
    "HeaderFix",
    "HeaderFixKind",
    "redact_library_logs",
    "sanitize_header",
    "sanitized_copy",
]

log = logging.getLogger(__name__)


class HeaderFixKind(str, Enum):
    """What :func:`sanitize_header` repaired in an element."""

    INVALID_DATE = "invalid-da"
    """A DA value that is not a real ``YYYYMMDD`` date; the element was blanked."""
    INVALID_TIME = "invalid-tm"
    """A TM value not of the form ``HH[MM[SS[.FFFFFF]]]``; the element was blanked."""
    NUL_STRIPPED = "nul-stripped"
    """NUL characters were removed from a text value."""
    UNREADABLE_VALUE = "unreadable-value"
    """The value could not be decoded at all; the element was blanked."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class HeaderFix:
    """One repair: which attribute (keyword, or tag when private) and what was done."""

    attribute: str
    kind: HeaderFixKind

    @property
    def code(self) -> str:
        """``<kind>:<attribute>``, e.g. ``invalid-da:PatientBirthDate``: safe to store and log."""
        return f"{self.kind.value}:{self.attribute}"


# Text VRs (PS3.5 Table 6.2-1) whose values may not hold NUL; UI may be NUL-padded.
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"}
)
_TM = re.compile(r"^([01]\d|2[0-3])([0-5]\d((60|[0-5]\d)(\.\d{1,6})?)?)?$")


def _valid_da(text: str) -> bool:
    if len(text) != 8 or not text.isdigit():
        return False
    try:
        datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return False
    return True


def _valid_tm(text: str) -> bool:
    return _TM.match(text) is not None


def _values(value: object) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (MultiValue, list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def _attribute(tag: BaseTag) -> str:
    return keyword_for_tag(tag) or f"({tag.group:04X},{tag.element:04X})"


def _fix_element(ds: Dataset, tag: BaseTag) -> HeaderFix | None:
    raw = ds.get_item(tag)
    vr = raw.VR if raw is not None else None
    if vr is None:
        # Implicit VR Little Endian (the default transfer syntax) carries no VR:
        # the data dictionary's is the one the value will be read with.
        try:
            vr = dictionary_VR(tag)
        except KeyError:  # private or unknown: not ours to repair
            return None
    if vr not in _TEXT_VRS:
        return None
    attribute = _attribute(tag)
    try:
        elem = ds[tag]
        values = _values(elem.value)
    except Exception:  # undecodable bytes, an unparseable number...
        ds[tag] = DataElement(tag, vr, None)
        return HeaderFix(attribute, HeaderFixKind.UNREADABLE_VALUE)
    fix: HeaderFix | None = None
    if any("\x00" in v for v in values):
        values = [v.replace("\x00", "") for v in values]
        fix = HeaderFix(attribute, HeaderFixKind.NUL_STRIPPED)
    stripped = [v.strip() for v in values]
    if vr == "DA" and not all(_valid_da(v) for v in stripped if v):
        ds[tag] = DataElement(tag, vr, None)
        return HeaderFix(attribute, HeaderFixKind.INVALID_DATE)
    if vr == "TM" and not all(_valid_tm(v) for v in stripped if v):
        ds[tag] = DataElement(tag, vr, None)
        return HeaderFix(attribute, HeaderFixKind.INVALID_TIME)
    if fix is not None:
        new_value: str | list[str] | None = values[0] if len(values) == 1 else (values or None)
        ds[tag] = DataElement(tag, vr, new_value)
    return fix


def sanitize_header(ds: Dataset) -> tuple[HeaderFix, ...]:
    """Repair ``ds``'s top-level text elements in place; return what was repaired.

    Invalid DA/TM values are blanked, NUL characters stripped from text
    values, undecodable text values blanked (module docstring). Pixel data
    and sequences are not touched. pydicom's warnings about the values are
    silenced while reading them, and its log lines redacted: both would quote
    the value.
    """
    redact_library_logs()
    fixes: list[HeaderFix] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for tag in list(ds.keys()):
            fix = _fix_element(ds, tag)
            if fix is not None:
                fixes.append(fix)
    return tuple(fixes)


def sanitized_copy(ds: Dataset) -> tuple[Dataset, tuple[HeaderFix, ...]]:
    """A shallow copy of ``ds`` with :func:`sanitize_header` applied; ``ds`` is unchanged.

    The copy shares unchanged elements (pixel data included) with ``ds`` and
    carries its ``file_meta``.
    """
    copy = Dataset()  # Dataset(ds) would share ds's element dictionary
    for tag in ds.keys():
        elem = ds.get_item(tag)
        if elem is not None:
            copy[tag] = elem
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        copy.file_meta = meta
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is not None and little is not None:
        copy.set_original_encoding(implicit, little)
    return copy, sanitize_header(copy)


class _RedactValues(logging.Filter):
    """Drop the offending value from pydicom's/pynetdicom's "invalid value" messages.

    pynetdicom decodes the C-STORE command set with pydicom; both log a
    malformed value verbatim, and a malformed value may be anything, PHI included.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if (
            message.startswith(("Invalid value for VR", "Non-conformant"))
            or "exceeds the maximum length" in message
        ):
            record.msg = f"{record.name}: invalid element value (value redacted)"
            record.args = ()
        return True


_REDACT = _RedactValues()
_REDACTED_LOGGERS = ("pydicom", "pynetdicom.utils")


def redact_library_logs() -> None:
    """Install the value-redacting filter on pydicom's and pynetdicom's loggers (idempotent)."""
    for name in _REDACTED_LOGGERS:
        library_log = logging.getLogger(name)
        if _REDACT not in library_log.filters:
            library_log.addFilter(_REDACT)
