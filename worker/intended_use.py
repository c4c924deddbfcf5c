"""Intended-use check: is the patient inside the population the model was validated on?

The model card declares the population (pediatric frontal chest X-rays, an upper
age in years). A study outside it still gets its result, flagged
:attr:`worker.flags.ResultFlag.OUTSIDE_INTENDED_USE` in the database, the SR
text and every listing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

from pydicom.dataset import Dataset

__all__ = [
    "AgeEvidence",
    "age_in_years",
    "intended_max_age",
    "outside_intended_use",
    "parse_age_string",
    "parse_da",
]

# PS3.5 §6.2, VR AS: "nnnD", "nnnW", "nnnM" or "nnnY". Real archives also
# hold non-conformant values such as "81" or "45Y" (seen in NIH ChestX-ray14
# DICOMs); a bare or short number is read as years rather than ignored, since
# ignoring it would hide an adult from the intended-use check.
_AGE_STRING = re.compile(r"^(\d{1,3})\s*([DWMY]?)$")
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}


@dataclass(frozen=True)
class AgeEvidence:
    """What the header says about the patient's age; values are never logged."""

    patient_age: str | None = None  # (0010,1010) Patient's Age, AS
    birth_date: date | None = None  # (0010,0030) Patient's Birth Date
    study_date: date | None = None  # (0008,0020) Study Date

    @classmethod
    def from_dataset(cls, ds: Dataset | None) -> AgeEvidence:
        """The age attributes of ``ds`` (PS3.3 §C.7.1.1, §C.7.2.1); empty for None."""
        if ds is None:
            return cls()
        age = str(ds.get("PatientAge", "") or "").strip() or None
        return cls(
            patient_age=age,
            birth_date=parse_da(ds.get("PatientBirthDate")),
            study_date=parse_da(ds.get("StudyDate")),
        )


def parse_age_string(value: str | None) -> float | None:
    """Age in years from a DICOM AS value, or None when absent or malformed."""
    if not value:
        return None
    match = _AGE_STRING.match(value.strip().upper())
    if not match:
        return None
    return int(match[1]) * _DAYS_PER_UNIT[match[2] or "Y"] / 365.25


def parse_da(value: object) -> date | None:
    """A DICOM DA value (YYYYMMDD, PS3.5 §6.2) as a date, or None."""
    text = str(value or "").strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def age_in_years(evidence: AgeEvidence) -> float | None:
    """Patient's Age when present and valid, else Study Date minus Birth Date."""
    age = parse_age_string(evidence.patient_age)
    if age is not None:
        return age
    if evidence.birth_date and evidence.study_date and evidence.study_date >= evidence.birth_date:
        return (evidence.study_date - evidence.birth_date).days / 365.25
    return None


def outside_intended_use(evidence: AgeEvidence, max_age_years: int | None) -> bool:
    """True when the header shows the patient older than ``max_age_years``.

    An unknown age is not flagged: the header gives no evidence against the
    intended use (the SR still names the intended population).
    """
    if max_age_years is None:
        return False
    age = age_in_years(evidence)
    # "up to 17 years" includes a 17-year-old until the 18th birthday.
    return age is not None and age >= max_age_years + 1


def intended_max_age(card_max_age_years: int | None, default_max_age_years: int) -> int:
    """The model card's upper age when it gives one, else the configured default."""
    return default_max_age_years if card_max_age_years is None else card_max_age_years
