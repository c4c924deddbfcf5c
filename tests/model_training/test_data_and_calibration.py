"""Patient-level split and calibration helpers."""

from __future__ import annotations

import numpy as np
import pytest

from model.calibration import (
    apply_temperature,
    fit_temperature,
    threshold_for_sensitivity,
)
from model.metrics import expected_calibration_error
from model.training_data import list_samples, patient_of, patient_split


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1000_bacteria_2931.jpeg", "PERSON1000"),
        ("person1000_virus_1681.jpeg", "PERSON1000"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-0115-0001.jpeg", "NORMAL2-IM-0115"),
        ("odd-name.png", "odd-name.png"),
    ],
)
def test_patient_of(name: str, patient: str) -> None:
    assert patient_of(name) == patient


def test_split_is_by_patient_stratified_and_reproducible(kermany) -> None:
    samples = list_samples(kermany)
    train, val = patient_split(samples, 0.15, seed=0)
    assert len(train) + len(val) == len(samples)
    assert not {s.patient for s in train} & {s.patient for s in val}
    for label in (0, 1):
        n_all = sum(s.label == label for s in samples)
        n_val = sum(s.label == label for s in val)
        assert 0.13 < n_val / n_all < 0.20
    again, _ = patient_split(samples, 0.15, seed=0)
    assert [s.path for s in again] == [s.path for s in train]
    other, _ = patient_split(samples, 0.15, seed=1)
    assert [s.path for s in other] != [s.path for s in train]


def test_fit_temperature_recovers_the_generating_temperature() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, 20000)  # over-confident logits
    y = rng.random(z.size) < 1 / (1 + np.exp(-z / 2.5))  # true temperature 2.5
    t = fit_temperature(z, y.astype(int))
    assert abs(t - 2.5) < 0.15
    ece_raw = expected_calibration_error(y, apply_temperature(z, 1.0))
    ece_cal = expected_calibration_error(y, apply_temperature(z, t))
    assert ece_cal < ece_raw / 3


def test_threshold_for_sensitivity_is_the_highest_that_meets_the_target() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(500) < 0.6).astype(int)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0, 1)
    thr = threshold_for_sensitivity(p, y, 0.95)
    sens = ((p >= thr) & (y == 1)).sum() / (y == 1).sum()
    assert sens >= 0.95
    higher = np.nextafter(thr, 1.0)
    assert ((p >= higher) & (y == 1)).sum() / (y == 1).sum() < 0.95
    with pytest.raises(ValueError):
        threshold_for_sensitivity(p, np.zeros_like(y), 0.95)


def test_fit_platt_recovers_temperature_and_bias() -> None:
    """A class-balanced loss shifts logits; the bias term must undo a known shift."""
    from model.calibration import fit_platt

    rng = np.random.default_rng(4)
    z = rng.normal(0, 3, 20000)
    y = rng.random(z.size) < 1 / (1 + np.exp(-(z / 1.5 + 1.0)))  # T = 1.5, b = +1
    t, b = fit_platt(z, y.astype(int))
    assert abs(t - 1.5) < 0.1 and abs(b - 1.0) < 0.1
    assert fit_platt(z, np.zeros(z.size, int)) == (1.0, 0.0)
