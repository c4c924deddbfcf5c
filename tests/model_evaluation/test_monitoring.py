"""model.monitoring and ``pneumo monitor`` on synthetic production score streams."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest

from model.monitoring import ScoredResult, population_stability_index, weekly_summaries

MONDAY = dt.datetime(2026, 11, 2, 9, 0)


def _reference(n: int = 800, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.7
    return 1 / (1 + np.exp(-rng.normal(np.where(y, 2.0, -2.0), 1.0)))


def _week(start: dt.datetime, scores: np.ndarray, not_chest: int = 0) -> list[ScoredResult]:
    return [
        ScoredResult(start + dt.timedelta(minutes=7 * i), float(p), i < not_chest, False)
        for i, p in enumerate(scores)
    ]


def test_psi_is_small_for_the_same_population_and_large_for_a_shifted_one() -> None:
    ref = _reference()
    assert population_stability_index(ref, _reference(seed=1)) < 0.1
    rng = np.random.default_rng(2)
    shifted = 1 / (1 + np.exp(-rng.normal(2.5, 0.7, 800)))  # almost everything "pneumonia"
    assert population_stability_index(ref, shifted) > 0.25
    with pytest.raises(ValueError, match="reference"):
        population_stability_index([], [0.5])


def test_weekly_summaries_flag_the_shifted_week_only() -> None:
    ref = _reference()
    rng = np.random.default_rng(3)
    stable = _week(MONDAY, _reference(200, seed=4))
    shifted = _week(MONDAY + dt.timedelta(weeks=1), rng.uniform(0.4, 0.6, 200), not_chest=30)
    weeks = weekly_summaries(stable + shifted, ref)
    assert [w.week for w in weeks] == ["2026-W45", "2026-W46"]
    assert [w.drift for w in weeks] == [False, True]
    assert weeks[0].not_chest_rate == 0 and weeks[1].not_chest_rate == pytest.approx(0.15)
    assert weeks[0].sensitivity is None  # no radiologist feedback yet


def test_confirmed_results_give_sensitivity_and_specificity() -> None:
    rows = [
        ScoredResult(MONDAY, 0.9, False, False, confirmed=True, finding=True),
        ScoredResult(MONDAY, 0.2, False, False, confirmed=True, finding=False),
        ScoredResult(MONDAY, 0.8, False, False, confirmed=False, finding=True),
        ScoredResult(MONDAY, 0.1, False, False, confirmed=False, finding=False),
        ScoredResult(MONDAY, 0.1, False, False, confirmed=False, finding=False),
    ]
    (week,) = weekly_summaries(rows, _reference())
    assert week.psi is None  # too few scores to compare
    assert week.sensitivity == 0.5 and week.specificity == pytest.approx(2 / 3)


def test_cli_writes_summary_and_plots_and_warns_on_drift(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import pneumo.commands.model as commands
    from model.evaluation import PREDICTION_COLUMNS
    from pneumo.cli import main

    reference = tmp_path / "predictions.csv"
    rows = [",".join(PREDICTION_COLUMNS)]
    rows += [f"v{i}.png,1,{p:.6f},0.1," for i, p in enumerate(_reference())]
    reference.write_text("\n".join(rows) + "\n")
    rng = np.random.default_rng(5)
    stream = _week(MONDAY, _reference(100, seed=6)) + _week(
        MONDAY + dt.timedelta(weeks=1), rng.uniform(0.45, 0.55, 100)
    )
    monkeypatch.setattr(commands, "_production_results", lambda since: stream)
    out = tmp_path / "monitor"
    code = main(
        ["monitor", "--reference", str(reference), "--out", str(out), "--since", "2026-11-01"]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert "score drift" in captured.err and "2026-W46" in captured.err
    assert "2026-W45" not in captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert [w["drift"] for w in summary["weeks"]] == [False, True]
    assert (out / "psi.png").stat().st_size > 0 and (out / "rates.png").stat().st_size > 0
