"""DICOM Unique Identifier rules: the one place UIDs are validated and derived.

PS3.5 §9.1: a UID is at most 64 characters of digits and dots; components
are non-empty and have no leading zero unless the component is exactly ``0``.
Anything that becomes part of a file path must pass :func:`is_valid_uid` first.
"""

from __future__ import annotations

import hashlib
import re

__all__ = [
    "MAX_UID_LENGTH",
    "UID_ROOT",
    "InvalidUIDError",
    "derive_uid",
    "is_valid_uid",
    "require_uid",
]

MAX_UID_LENGTH = 64
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

# The UID root under which pneumo derives its own UIDs: the "2.25" arc
# (PS3.5 §B.2, UUID-derived UIDs) needs no registration.
UID_ROOT = "2.25."


class InvalidUIDError(ValueError):
    """A value offered as a DICOM UID does not follow PS3.5 §9.1."""


def is_valid_uid(value: object) -> bool:
    """Return True when ``value`` is a string that follows the UID grammar of PS3.5 §9.1."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_UID_LENGTH
        and _UID.match(value) is not None
    )


def require_uid(value: object, what: str = "UID") -> str:
    """Return ``value`` if it is a valid UID.

    Raises:
        InvalidUIDError: ``value`` does not follow PS3.5 §9.1; the message names
            ``what`` and the length, never the value (a malformed "UID" may carry PHI).
    """
    if not is_valid_uid(value):
        length = len(value) if isinstance(value, str) else "n/a"
        raise InvalidUIDError(f"{what} is not a valid DICOM UID (length {length})")
    return value  # type: ignore[return-value]


def derive_uid(*parts: object) -> str:
    """Derive a deterministic UID under ``2.25`` from ``parts``.

    The same parts always give the same UID, so re-creating an object (e.g. the
    SR for (study UID, model version, revision)) replaces rather than duplicates.
    """
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    # 2.25 + a decimal integer of up to 39 digits (128 bits) fits in 64 chars.
    number = int.from_bytes(digest[:16], "big")
    return f"{UID_ROOT}{number}"
