"""Intended-use flag from Patient's Age (AS) or Birth Date vs Study Date."""

from __future__ import annotations

from datetime import date

import pytest

from worker.intended_use import AgeEvidence, age_in_years, outside_intended_use, parse_age_string


@pytest.mark.parametrize(
    ("value", "years"),
    [
        ("045Y", 45.0),
        ("006M", 0.5),
        ("052W", 52 * 7 / 365.25),
        ("010D", 10 / 365.25),
        # non-conformant values found in real archives are read as years
        ("81", 81.0),
        ("45Y", 45.0),
    ],
)
def test_age_strings(value: str, years: float) -> None:
    assert parse_age_string(value) == pytest.approx(years, rel=1e-3)


@pytest.mark.parametrize("value", [None, "", "045X", "0045Y", "abcY", "-12Y"])
def test_malformed_age_strings_are_unknown(value: str | None) -> None:
    assert parse_age_string(value) is None


def test_adult_by_age_is_outside() -> None:
    assert outside_intended_use(AgeEvidence(patient_age="045Y"), 17)
    assert not outside_intended_use(AgeEvidence(patient_age="017Y"), 17)
    assert outside_intended_use(AgeEvidence(patient_age="018Y"), 17)


def test_birth_date_used_when_age_missing() -> None:
    adult = AgeEvidence(birth_date=date(1980, 1, 1), study_date=date(2024, 1, 1))
    child = AgeEvidence(birth_date=date(2019, 6, 1), study_date=date(2024, 1, 1))
    assert age_in_years(adult) == pytest.approx(44, abs=0.01)
    assert outside_intended_use(adult, 17)
    assert not outside_intended_use(child, 17)


def test_unknown_age_or_no_limit_is_not_flagged() -> None:
    assert not outside_intended_use(AgeEvidence(), 17)
    assert not outside_intended_use(AgeEvidence(patient_age="080Y"), None)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_evidence_from_a_header() -> None:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.PatientAge = " 045Y "
    ds.PatientBirthDate = "19800101"
    ds.StudyDate = "2024013"  # malformed: ignored, not an error
    assert AgeEvidence.from_dataset(ds) == AgeEvidence("045Y", date(1980, 1, 1), None)
    assert AgeEvidence.from_dataset(Dataset()) == AgeEvidence.from_dataset(None) == AgeEvidence()


def test_card_limit_wins_over_the_configured_default() -> None:
    from worker.intended_use import intended_max_age

    assert intended_max_age(12, 17) == 12
    assert intended_max_age(None, 17) == 17
