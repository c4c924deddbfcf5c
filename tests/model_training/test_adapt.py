"""model.adapt / ``pneumo model adapt``: label-free site adaptation."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model.adapt import adapt_weights, estimate_prior
from model.inference import Predictor, default_weights_path, read_weights_file
from tests.conftest import need_shared
from tests.paths import KERMANY

_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def site_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 kermany/test images flattened into one folder: no class folders, no labels."""
    test = need_shared(KERMANY / "test")
    folder = tmp_path_factory.mktemp("site")
    files = sorted((test / "NORMAL").glob("*.jpeg"))[:10]
    files += sorted((test / "PNEUMONIA").glob("*.jpeg"))[:10]
    for i, f in enumerate(files):
        shutil.copy(f, folder / f"img{i:02d}.jpeg")  # the name says nothing of the label
    return folder


def _images(folder: Path) -> list[np.ndarray]:
    from model.images import load_image_file

    return [load_image_file(p) for p in sorted(folder.glob("*.jpeg"))]


def test_adaptation_changes_only_normalisation_statistics(site_folder: Path, tmp_path) -> None:
    source = default_weights_path()
    out = adapt_weights(source, _images(site_folder), tmp_path / "site.pt", "1.0.0-site1").path
    before = read_weights_file(source)
    after = read_weights_file(out)
    changed = {
        k
        for k, v in before["state_dict"].items()
        if not torch.equal(v.float(), after["state_dict"][k].float())
    }
    assert changed, "nothing was re-estimated"
    assert all(k.endswith(_RUNNING) for k in changed), sorted(changed)[:5]
    assert any(k.endswith("running_mean") for k in changed)
    for key in ("temperature", "bias", "threshold", "input_size", "net_config"):
        assert after[key] == before[key], key
    # the guard: re-centred (means, scales, threshold), its learned covariance shape kept
    from model.ood import OODModel

    guards = OODModel.from_dict(before["ood"]), OODModel.from_dict(after["ood"])
    for b, a in zip(*(g.layers for g in guards), strict=True):
        # the source file keeps the full matrix, the new one its upper triangle (model.ood)
        assert np.array_equal(np.triu(a.precision), np.triu(b.precision))
        assert not np.array_equal(a.mean, b.mean)
    site = Predictor(out).predict(_images(site_folder))
    assert sum(r.is_chest for r in site) >= 19  # its own radiographs pass the re-centred guard
    assert after["version"] == "1.0.0-site1" and after["adaptation"]["n_images"] == 20
    assert after["adaptation"]["prior_site"] is None
    assert Predictor(out).info.version == "1.0.0-site1"


def test_prior_adaptation_moves_probabilities_not_decisions(site_folder: Path, tmp_path) -> None:
    images = _images(site_folder)
    plain = adapt_weights(default_weights_path(), images, tmp_path / "a.pt", "a").path
    prior = adapt_weights(default_weights_path(), images, tmp_path / "b.pt", "b", adapt_prior=True)
    assert prior.prior_site is not None and 0 < prior.prior_site < 1
    assert prior.prior_site != pytest.approx(prior.prior_source, abs=1e-3)
    a, b = Predictor(plain), Predictor(prior.path)
    assert b.info.bias != a.info.bias and b.info.threshold != a.info.threshold
    pa, pb = a.predict(images), b.predict(images)
    assert [p.finding for p in pa] == [p.finding for p in pb]
    # a higher site prior raises every probability, a lower one lowers it
    up = prior.prior_site > prior.prior_source
    for x, z in zip(pa, pb, strict=True):
        assert (z.probability > x.probability) == up


def test_em_recovers_the_site_prior_from_calibrated_probabilities() -> None:
    """Scores calibrated for a 50 % prior, drawn at a 20 % site: EM finds about 0.2."""
    rng = np.random.default_rng(0)
    y = rng.random(20000) < 0.2
    x = rng.normal(np.where(y, 1.0, -1.0), 1.0)
    p_balanced = 1 / (1 + np.exp(-2 * x))  # exact posterior when both classes are equally likely
    assert estimate_prior(p_balanced, 0.5) == pytest.approx(0.2, abs=0.02)
    assert estimate_prior(p_balanced, 0.5) != pytest.approx(float(p_balanced.mean()), abs=0.02)
    with pytest.raises(ValueError, match="prior_source"):
        estimate_prior(p_balanced, 1.0)


def test_adapt_refuses_too_few_images_or_overwriting_its_source(tmp_path) -> None:
    img = [np.full((64, 64), 0.5, np.float32)] * 20
    with pytest.raises(ValueError, match="images"):
        adapt_weights(default_weights_path(), img[:3], tmp_path / "x.pt", "x")
    with pytest.raises(ValueError, match="out"):
        adapt_weights(default_weights_path(), img, default_weights_path(), "x")


def test_cli_adapts_on_a_folder_without_labels(site_folder: Path, tmp_path, capsys) -> None:
    from pneumo.cli import main

    out = tmp_path / "pneumonet-1.0.0-site.pt"
    assert (
        main(
            [
                "model",
                "adapt",
                "--data",
                str(site_folder),
                "--out",
                str(out),
                "--version",
                "1.0.0-site",
                "--prior",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert str(out) in printed and "20 images" in printed and "pneumonia share" in printed
    assert read_weights_file(out)["adaptation"]["n_images"] == 20
    assert (
        main(
            [
                "model",
                "adapt",
                "--data",
                str(tmp_path / "none"),
                "--out",
                str(out),
                "--version",
                "x",
            ]
        )
        == 2
    )
    assert not math.isnan(Predictor(out).info.threshold)
