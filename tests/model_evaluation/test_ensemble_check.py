"""The ensemble check on the two shipped models: validation only, same split required."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.ensemble_check import ensemble_check
from model.inference import WEIGHTS_DIR, read_weights_file
from model.metrics import roc_auc
from model.network import NetConfig, build_network
from model.shift import perturbed_view
from model.train import network_outputs
from model.training_data import list_samples, load_pixels, patient_split
from tests.conftest import need_shared
from tests.paths import KERMANY, REPO

MEMBERS = (WEIGHTS_DIR / "pneumonet-1.0.0.pt", WEIGHTS_DIR / "pneumonet-2.0.0.pt")
LIMIT = 12  # validation images per class


@pytest.fixture(scope="module")
def train_dir() -> Path:
    return need_shared(KERMANY / "train")


def test_members_and_logit_mean_on_the_validation_split(train_dir: Path, tmp_path: Path) -> None:
    for member in MEMBERS:
        if not member.exists():
            pytest.skip(f"{member.name} not shipped")
    check = ensemble_check(MEMBERS, train_dir, cache_dir=tmp_path, limit=LIMIT)
    assert check.members == ("pneumonet-1.0.0", "pneumonet-2.0.0")
    assert (check.n_val, check.n_val_pneumonia) == (2 * LIMIT, LIMIT)
    assert [r.candidate for r in check.rows] == [
        "pneumonet-1.0.0",
        "pneumonet-2.0.0",
        "ensemble(pneumonet-1.0.0 + pneumonet-2.0.0)",
    ]
    for row in check.rows:
        assert 0.5 < row.val_auc <= 1.0 and 0.5 < row.perturbed_auc <= 1.0
        assert row.perturbed_sensitivity >= 0.95  # the operating rule, on the perturbed view

    # The images are the validation patients of the members' split, never kermany/test.
    _, val = patient_split(list_samples(train_dir), 0.15, 0)
    val_paths = {s.path for s in val}
    cached = sorted(tmp_path.glob("pixels-*.npy"))
    assert len(cached) == 1
    chosen = [s for s in val if s.label == 0][:LIMIT] + [s for s in val if s.label == 1][:LIMIT]
    assert {s.path for s in chosen} <= val_paths

    # The ensemble row is the AUC of the mean of the members' logits, recomputed here.
    labels = np.array([s.label for s in chosen])
    pixels = load_pixels(chosen, 224, cache_dir=tmp_path)
    shifted = perturbed_view(pixels, 0)
    logits = []
    for member in MEMBERS:
        payload = read_weights_file(member)
        config = NetConfig.from_dict(payload["net_config"])
        net = build_network(config)
        net.load_state_dict({k: v.float() if v.is_floating_point() else v
                             for k, v in payload["state_dict"].items()})  # fmt: skip
        mirror = payload.get("tta", "hflip-mean-logit") != "none"
        logits.append(
            network_outputs(
                net,
                shifted,
                torch.device("cpu"),
                mirror=mirror,
                channels_last=config.arch != "pneumonet",
            )[0]  # fmt: skip
        )
    assert check.rows[-1].perturbed_auc == pytest.approx(
        roc_auc(labels, 1 / (1 + np.exp(-np.mean(logits, 0))))
    )


def test_a_member_from_another_split_or_a_lone_member_is_refused(
    train_dir: Path, tmp_path: Path
) -> None:
    payload = read_weights_file(MEMBERS[1])
    payload["training"]["config"]["seed"] = 1  # trained on another patient split
    other = tmp_path / "pneumonet-9.9.9.pt"
    torch.save(payload, other)
    with pytest.raises(ValueError, match="different splits"):
        ensemble_check([MEMBERS[1], other], train_dir, limit=2)
    with pytest.raises(ValueError, match="at least two"):
        ensemble_check([MEMBERS[1]], train_dir, limit=2)


def test_cli_prints_the_table(train_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    run = subprocess.run(
        [sys.executable, "-m", "pneumo.cli", "model", "ensemble-check", *map(str, MEMBERS),
         "--data", str(train_dir), "--out", str(out), "--cache-dir", str(tmp_path),
         "--limit", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "| ensemble(pneumonet-1.0.0 + pneumonet-2.0.0) |" in run.stdout
    assert out.exists() and '"rows"' in out.read_text()
    bad = subprocess.run(
        [sys.executable, "-m", "pneumo.cli", "model", "ensemble-check", str(MEMBERS[0])],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0 and "at least two" in bad.stderr
