"""model.adapt_check: the split-half protocol for label-free site adaptation."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from model.adapt_check import patient_halves, split_half_adaptation
from model.evaluation import evaluate
from model.evaluation_sets import open_dataset
from model.inference import default_weights_path, load_predictor, read_weights_file
from model.training_data import patient_of
from tests.model_evaluation.conftest import kermany_files
from tests.paths import REPO


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A labelled folder of 30 real test images per class (the 'new site')."""
    root = tmp_path / "site"
    for cls, files in kermany_files(30).items():
        (root / cls).mkdir(parents=True)
        for f in files:
            shutil.copy(f, root / cls / f.name)
    return root


def test_halves_split_patients_not_images(site: Path) -> None:
    dataset = open_dataset(site)
    a, b = patient_halves(dataset, seed=0)
    assert len(a) + len(b) == len(dataset) and len(a) > 0 and len(b) > 0

    def patients(half):  # type: ignore[no-untyped-def]
        return {f"{i.label}:{patient_of(Path(i.ref).name)}" for i in half.items}

    assert not patients(a) & patients(b)
    assert {i.ref for i in a.items} | {i.ref for i in b.items} == {i.ref for i in dataset.items}
    again = patient_halves(dataset, seed=0)
    assert [i.ref for i in again[0].items] == [i.ref for i in a.items]  # deterministic
    other_seed = patient_halves(dataset, seed=1)
    assert [i.ref for i in other_seed[0].items] != [i.ref for i in a.items]


def test_both_directions_scored_on_the_half_not_adapted_on(site: Path, tmp_path: Path) -> None:
    weights = default_weights_path()
    dataset = open_dataset(site)
    check = split_half_adaptation(weights, dataset, tmp_path / "work")
    assert [(h.adapted_on, h.scored_on) for h in check.halves] == [("A", "B"), ("B", "A")]
    halves = patient_halves(dataset)
    plain = load_predictor(weights)
    for h, scored_half, adapt_half in zip(
        check.halves, (halves[1], halves[0]), halves, strict=True
    ):
        assert h.n_adapt_images == len(adapt_half)
        direct = evaluate(plain, scored_half, n_bootstrap=0)
        # the guard is re-centred with the network: the site's radiographs are still scored
        assert h.n_scored >= 0.9 * direct.n, (h.n_scored, direct.n)
        assert h.plain["roc_auc"] == pytest.approx(direct.to_json()["roc_auc"]["value"])
        assert h.adapted["roc_auc"] is not None
    # what was adapted: BatchNorm running statistics only
    source = read_weights_file(weights)["state_dict"]
    adapted = read_weights_file(tmp_path / "work" / "adapted-on-A.pt")["state_dict"]
    changed = {k for k in source if not (source[k].float() == adapted[k].float()).all()}
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert changed and all(k.endswith(stats) for k in changed)


def test_cli_prints_both_halves_and_writes_json(site: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapt.json"
    run = subprocess.run(
        [sys.executable, "-m", "pneumo.cli", "model", "adapt-check", "--data", str(site)]
        + ["--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.strip().startswith(("A ", "B "))]
    assert len(lines) == 2 and "->" in lines[0]
    import json

    from model.card import build_card, render_markdown

    card = build_card(default_weights_path(), {}, adaptation=json.loads(out.read_text()))
    text = render_markdown(card)
    assert "Label-free site adaptation" in text and "| A | B |" in text
