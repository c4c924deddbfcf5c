"""UID grammar (PS3.5 §9.1) and deterministic derivation."""

from __future__ import annotations

import pytest

from dicom_io.uids import InvalidUIDError, derive_uid, is_valid_uid, require_uid


@pytest.mark.parametrize(
    "uid", ["1.2.840.10008.1.2", "0", "1.0.3", "2.25." + "9" * 39, "1." + "2" * 62]
)
def test_valid(uid: str) -> None:
    assert is_valid_uid(uid)
    assert require_uid(uid) == uid


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "1..2",
        ".1.2",
        "1.2.",
        "1.02",
        "1.2.a",
        "../../etc/passwd",
        "1.2/3",
        "1." + "2" * 63,
        "1.2 ",
        None,
        12,
    ],
)
def test_invalid(uid: object) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUIDError) as info:
        require_uid(uid, "Study Instance UID")
    if isinstance(uid, str) and uid:
        assert uid not in str(info.value)  # never echo the value: it may carry PHI


def test_derive_is_deterministic_and_valid() -> None:
    first = derive_uid("1.2.3", "pneumocnn-1.0.0", 1)
    assert first == derive_uid("1.2.3", "pneumocnn-1.0.0", 1)
    assert first != derive_uid("1.2.3", "pneumocnn-1.0.0", 2)
    assert is_valid_uid(first) and first.startswith("2.25.")
