"""The shipped weights: load once, deterministic, batch-invariant, heatmaps, card AUC."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.images import load_image_file
from model.inference import Prediction, default_weights_path, load_predictor
from tests.conftest import need_shared
from tests.paths import KERMANY


@pytest.fixture(scope="module")
def predictor():
    return load_predictor()


@pytest.fixture(scope="module")
def chest_images(kermany):
    test = need_shared(KERMANY / "test")
    files = sorted((test / "NORMAL").glob("*.jpeg"))[:3]
    files += sorted((test / "PNEUMONIA").glob("*.jpeg"))[:3]
    files += sorted((kermany / "PNEUMONIA").glob("*.jpeg"))[:40:10]  # larger originals
    return [load_image_file(f) for f in files]


def test_shipped_weights_load_once_and_fit_the_size_limit(predictor) -> None:
    path = default_weights_path()
    assert path.stat().st_size <= 30 * 1024 * 1024
    assert load_predictor() is predictor
    info = predictor.info
    assert path.name == f"{info.name}-{info.version}.pt" and len(info.sha256) == 64
    assert info.temperature > 0 and 0 < info.threshold < 1 and info.ood_threshold > 0


def test_predict_is_deterministic_and_batch_size_invariant(predictor, chest_images) -> None:
    batched = predictor.predict(chest_images)
    again = predictor.predict(chest_images)
    single = [predictor.predict([im])[0] for im in chest_images]
    assert [p.probability for p in batched] == [p.probability for p in again]
    for a, b in zip(batched, single, strict=True):
        assert isinstance(a, Prediction)
        assert abs(a.probability - b.probability) < 1e-4
        assert abs(a.ood_score - b.ood_score) < 1e-3 * max(1.0, a.ood_score)
        assert a.is_chest == (a.ood_score <= predictor.info.ood_threshold)
        assert a.finding == (a.is_chest and a.probability >= predictor.info.threshold)
    assert predictor.predict([]) == []


def test_heatmaps_have_each_inputs_shape(predictor, chest_images) -> None:
    rng = np.random.default_rng(0)
    images = chest_images[:2] + [rng.random((97, 211), dtype=np.float32)]
    maps = predictor.heatmaps(images)
    assert len(maps) == len(images)
    for im, hm in zip(images, maps, strict=True):
        assert hm.shape == im.shape and hm.dtype == np.float32
        assert np.isfinite(hm).all() and hm.min() >= 0.0 and hm.max() <= 1.0
    assert any(hm.max() == 1.0 for hm in maps)  # normalised, not all-empty


def test_shipped_model_reproduces_the_model_card_test_auc(predictor, kermany) -> None:
    """kermany/test AUC recomputed from the shipped weights equals the card's (±0.002)."""
    card_path = default_weights_path().with_suffix(".json")
    if not card_path.exists():
        pytest.skip(f"no model card {card_path.name} beside the shipped weights")
    card = json.loads(card_path.read_text())
    assert card["sha256"] == predictor.info.sha256
    expected = card["evaluations"]["kermany/test"]["roc_auc"]["value"]
    from sklearn.metrics import roc_auc_score

    labels, probs = [], []
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        files = sorted((need_shared(KERMANY / "test") / cls).glob("*.jpeg"))
        for i in range(0, len(files), 64):
            for p in predictor.predict([load_image_file(f) for f in files[i : i + 64]]):
                if p.is_chest:  # the card's metrics leave out not-processed images
                    labels.append(label)
                    probs.append(p.probability)
    assert len(labels) == card["evaluations"]["kermany/test"]["n"]
    assert abs(roc_auc_score(labels, probs) - expected) <= 0.002


class _RunsCode:
    """Unpickling this calls a function: what a hostile weights file would do."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.getenv, ("PATH",))


def test_weights_files_are_loaded_without_running_code(tmp_path) -> None:
    """``torch.load(weights_only=True)``: a pickle that calls a function is refused."""
    import torch

    from model.inference import WeightsError, read_weights_file

    hostile = tmp_path / "hostile.pt"
    torch.save({"format": 1, "payload": _RunsCode()}, hostile)
    with pytest.raises(WeightsError):
        load_predictor(hostile)
    # The shipped file (tensors + the guard's numpy statistics) is accepted.
    payload = read_weights_file(default_weights_path())
    assert payload["format"] == 1 and "state_dict" in payload


def test_single_pass_equals_predict_and_heatmaps(predictor, chest_images) -> None:
    """One forward pass gives predict()'s probabilities and heatmaps()'s Grad-CAM maps."""
    rng = np.random.default_rng(1)
    images = chest_images + [rng.random((97, 211), dtype=np.float32)]
    predictions, maps = predictor.predict_with_heatmaps(images)
    expected, expected_maps = predictor.predict(images), predictor.heatmaps(images)
    assert len(predictions) == len(maps) == len(images)
    for got, want in zip(predictions, expected, strict=True):
        assert isinstance(got, Prediction)
        assert abs(got.probability - want.probability) < 1e-5
        assert abs(got.ood_score - want.ood_score) <= 1e-5 * max(1.0, want.ood_score)
        assert got.is_chest == want.is_chest
    for im, hm, ref in zip(images, maps, expected_maps, strict=True):
        assert hm.shape == im.shape and hm.dtype == np.float32
        assert np.isfinite(hm).all() and hm.min() >= 0.0 and hm.max() <= 1.0
        if ref.max() == 0:
            assert hm.max() <= 1e-3  # no positive evidence in either pass
        else:
            assert np.corrcoef(hm.ravel(), ref.ravel())[0, 1] >= 0.99
    assert predictor.predict_with_heatmaps([]) == ([], [])


def test_single_pass_maps_at_requested_sizes(predictor, chest_images) -> None:
    """Maps asked for at a smaller size: same predictions, the map computed at that size
    (what the worker's heatmap capture shows) agrees with the full-size map scaled down."""
    import torch
    import torch.nn.functional as F

    images = chest_images[:2]
    shapes = [(max(1, im.shape[0] // 3), max(1, im.shape[1] // 3)) for im in images]
    predictions, maps = predictor.predict_with_heatmaps(images, shapes)
    full_predictions, full_maps = predictor.predict_with_heatmaps(images)
    for got, want in zip(predictions, full_predictions, strict=True):
        assert got.probability == want.probability and got.ood_score == want.ood_score
    for hm, full, shape in zip(maps, full_maps, shapes, strict=True):
        assert hm.shape == shape and hm.dtype == np.float32
        assert hm.min() >= 0.0 and hm.max() <= 1.0
        scaled = F.interpolate(torch.from_numpy(full)[None, None], size=shape, mode="area")
        if full.max() > 0:
            assert np.corrcoef(hm.ravel(), scaled.numpy().ravel())[0, 1] >= 0.99
    with pytest.raises(ValueError, match="heatmap shapes"):
        predictor.predict_with_heatmaps(images, shapes[:1])
