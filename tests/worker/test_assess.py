"""Stage 4, assess, as a pure function of hand-made predictions and age evidence."""

from __future__ import annotations

from datetime import date

import pytest

from db.models import ResultStatus
from tests.worker.studies import FakePrediction
from worker.flags import ResultFlag
from worker.intended_use import AgeEvidence
from worker.stages.assess import assess, summary_text

CHILD = AgeEvidence(patient_age="006Y")
ADULT = AgeEvidence(birth_date=date(1980, 1, 1), study_date=date(2024, 1, 1))


def test_highest_chest_probability_decides() -> None:
    result = assess(
        [FakePrediction(0.3), FakePrediction(0.7), FakePrediction(0.99, is_chest=False)],
        CHILD,
        threshold=0.5,
        max_age_years=17,
    )
    assert result.status is ResultStatus.COMPLETE
    assert result.probability == pytest.approx(0.7)  # the rejected image does not count
    assert result.finding is True and result.ood is True
    assert result.flags == (ResultFlag.NOT_CHEST,)
    assert result.summary == "Pneumonia suspected (probability 0.7000 >= threshold 0.5000)."


def test_below_threshold_and_inside_intended_use_has_no_flag() -> None:
    result = assess([FakePrediction(0.2)], CHILD, threshold=0.5, max_age_years=17)
    assert result.finding is False and result.flags == () and not result.outside_intended_use
    assert result.summary.startswith("No pneumonia detected (probability 0.2000 < ")


def test_adult_is_flagged_but_still_assessed() -> None:
    result = assess([FakePrediction(0.6)], ADULT, threshold=0.5, max_age_years=17)
    assert result.outside_intended_use and result.max_age_years == 17
    assert result.flags == (ResultFlag.OUTSIDE_INTENDED_USE,)
    assert result.status is ResultStatus.COMPLETE
    assert not assess([FakePrediction(0.6)], ADULT, threshold=0.5, max_age_years=None).flags


def test_nothing_read_means_no_usable_image() -> None:
    result = assess([], ADULT, threshold=0.5, max_age_years=17)
    assert result.status is ResultStatus.NO_USABLE_IMAGE
    assert result.probability is None and result.finding is None and not result.ood
    assert result.flags == (ResultFlag.OUTSIDE_INTENDED_USE, ResultFlag.NO_USABLE_IMAGE)
    assert result.summary == summary_text(None, 0.5, None)


def test_every_image_rejected_flags_both() -> None:
    result = assess([FakePrediction(0.9, is_chest=False)], CHILD, threshold=0.5, max_age_years=17)
    assert result.flags == (ResultFlag.NOT_CHEST, ResultFlag.NO_USABLE_IMAGE)
    assert result.probability is None


def test_flag_codes_are_the_stored_strings() -> None:
    assert [f.value for f in ResultFlag] == [
        "outside-intended-use",
        "not-chest-xray",
        "no-usable-image",
    ]
    assert str(ResultFlag.NOT_CHEST) == f"{ResultFlag.NOT_CHEST}" == "not-chest-xray"
    assert ResultFlag.NO_USABLE_IMAGE.value == ResultStatus.NO_USABLE_IMAGE.value
