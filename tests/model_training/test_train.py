"""A tiny training run writes a loadable model, checkpoints, and resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.card import build_card, experiment_row, render_markdown
from model.inference import Predictor, read_weights_file
from model.train import TrainConfig, run_training


def _config(kermany, tmp_path, epochs: int) -> TrainConfig:
    return TrainConfig(
        data=kermany,
        work_dir=tmp_path / "work",
        out_dir=tmp_path / "out",
        name="tiny",
        version="0.0.0-test",
        epochs=epochs,
        batch_size=8,
        limit=16,
        width=8,
        blocks="1,1,1,1",
        input_size=64,
        val_fraction=0.3,
        progress=False,
        threads=1,
    )


def test_tiny_run_exports_a_loadable_model_and_resumes(kermany, tmp_path) -> None:
    path = run_training(_config(kermany, tmp_path, 1))
    assert path == tmp_path / "out" / "tiny-0.0.0-test.pt" and path.exists()
    last = read_weights_file(tmp_path / "work" / "last.pt")
    assert last["epoch"] == 0 and len(last["history"]) == 1
    first_epoch = last["history"][0]

    pred = Predictor(path)
    assert pred.info.version == "0.0.0-test" and pred.info.input_size == 64
    assert pred.info.temperature > 0 and 0 <= pred.info.threshold <= 1
    rng = np.random.default_rng(0)
    out = pred.predict([rng.random((80, 90), dtype=np.float32)])
    assert len(out) == 1 and 0.0 <= out[0].probability <= 1.0

    # "interrupted" after epoch 1: a second run with 2 epochs continues, not restarts
    run_training(_config(kermany, tmp_path, 2))
    last = read_weights_file(tmp_path / "work" / "last.pt")
    assert last["epoch"] == 1 and len(last["history"]) == 2
    assert last["history"][0] == first_epoch
    payload = read_weights_file(path)
    assert payload["training"]["epochs_run"] == 2


def _tiny_recipe(recipe: str, kermany, tmp_path, **overrides: object) -> TrainConfig:
    """A named recipe shrunk to seconds: one epoch of a few 64 px images per class."""
    tiny: dict[str, object] = dict(
        data=kermany,
        work_dir=tmp_path / "work",
        out_dir=tmp_path / "out",
        epochs=1,
        batch_size=8,
        input_size=64,
        val_fraction=0.3,
        progress=False,
        threads=1,
    )
    return TrainConfig.for_recipe(recipe, **{**tiny, **overrides})


def test_quick_recipe_on_a_tiny_subset_trains_and_its_checkpoint_loads(kermany, tmp_path) -> None:
    """The recipe sites retrain with, shrunk to seconds: perturbed validation is scored."""
    config = _tiny_recipe("quick", kermany, tmp_path, limit=12)
    assert config.shift_prob > 0 and config.arch == "pneumonet" and config.max_minutes <= 60
    path = run_training(config)
    last = read_weights_file(tmp_path / "work" / "last.pt")
    assert 0.0 <= last["history"][0]["val_auc_perturbed"] <= 1.0
    payload = read_weights_file(path)
    assert payload["net_config"]["blocks"] == [2, 2, 2, 2]
    assert set(payload["training"]["validation_perturbed"]) >= {"roc_auc", "sensitivity"}
    pred = Predictor(path)
    assert pred.info.version == config.version
    out = pred.predict([np.random.default_rng(0).random((70, 50), dtype=np.float32)])
    assert 0.0 <= out[0].probability <= 1.0

    # the card's experiment table and test log come from what the weights file recorded
    row = experiment_row("quick-tiny", path, saw_test=True)
    assert row["perturbed_val_auc"] == payload["training"]["validation_perturbed"]["roc_auc"]
    card = build_card(path, {}, experiments=[row, {**row, "candidate": "other", "saw_test": False}])
    assert card["test_log"] == ["quick-tiny"]
    text = render_markdown(card)
    assert "perturbed val AUC" in text and "Candidates scored on kermany/test: quick-tiny." in text
    assert "perturbed-validation sensitivity" in card["calibration"]["threshold_rule"]

    # a later release carries an earlier card's rows, whose weights files may be gone
    from model.card import main as card_main
    from tests.paths import REPO

    earlier = REPO / "model" / "weights" / "pneumonet-2.0.0.json"
    card_main(["--weights", str(path), "--out-dir", str(tmp_path / "card"),
               "--experiments-from", str(earlier), "--experiment", f"quick-tiny={path}"])  # fmt: skip
    written = json.loads((tmp_path / "card" / f"{path.stem}.json").read_text())
    carried = json.loads(earlier.read_text())["experiments"]
    assert written["experiments"][: len(carried)] == carried
    assert written["experiments"][-1]["candidate"] == "quick-tiny"
    assert written["test_log"] == [r["candidate"] for r in carried if r["saw_test"]]


def test_torchvision_resnet_without_mirror_tta_exports_and_serves(kermany, tmp_path) -> None:
    """The full recipe's trunk (torchvision ResNet-18, 1-channel stem, no download) end to end."""
    config = _tiny_recipe("full", kermany, tmp_path, limit=8, tta="none")
    path = run_training(config)
    payload = read_weights_file(path)
    assert payload["net_config"]["arch"] == "resnet18" and payload["tta"] == "none"
    assert payload["state_dict"]["stem.0.weight"].shape[1] == 1
    assert payload["state_dict"]["stem.0.weight"].dtype == torch.float16  # the recipe's 22 MB
    pred = Predictor(path)
    images = [np.random.default_rng(i).random((64, 80), dtype=np.float32) for i in range(3)]
    probs = [p.probability for p in pred.predict(images)]
    assert probs == pytest.approx([pred.predict([im])[0].probability for im in images], abs=1e-4)
    assert pred.heatmaps(images[:1])[0].shape == (64, 80)


def test_unknown_recipe_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="recipe"):
        TrainConfig.for_recipe("overnight")


def test_resume_key_follows_the_recipe_not_the_run_settings(tmp_path) -> None:
    """A rerun may change threads, TTA, stored dtype or epochs and still resume its checkpoint."""
    from model.train import _config_key

    base = TrainConfig.for_recipe("full", work_dir=tmp_path)
    same = TrainConfig.for_recipe(
        "full", work_dir=tmp_path, threads=2, tta="none", weights_dtype="float32", epochs=30
    )
    assert _config_key(same) == _config_key(base)
    assert _config_key(TrainConfig.for_recipe("full", work_dir=tmp_path, shift_prob=0.3)) != (
        _config_key(base)
    )
    # fields at their defaults stay out of the key: adding a field never orphans a run
    assert _config_key(TrainConfig()) == _config_key(TrainConfig(mixup=0.0, tta="none"))


def test_equalised_model_records_it_and_serves_through_it(kermany, tmp_path) -> None:
    """--equalize is a preprocessing choice the weights file carries: the served model
    equalises (so a monotone grey-level change leaves its probability unchanged) and a
    model trained without it does not."""
    from dataclasses import replace

    config = replace(_config(kermany, tmp_path, epochs=1), equalize=True)
    path = run_training(config)
    assert read_weights_file(path)["equalize"] is True
    pred = Predictor(path)
    assert pred.info.equalize
    # at the input size (no resampling, which would mix levels) with 64 grey levels, spaced
    levels = np.random.default_rng(5).integers(0, 64, (config.input_size,) * 2) * 4
    image = (levels / 255.0).astype(np.float32)
    curved = ((levels / 255.0) ** 0.6).astype(np.float32)  # monotone; levels stay apart
    same = pred.predict([image, curved])
    assert same[0].probability == pytest.approx(same[1].probability, abs=1e-6)

    plain = Predictor(run_training(replace(config, version="0.0.1-plain", equalize=False)))
    assert not plain.info.equalize
    differ = plain.predict([image, curved])
    assert differ[0].probability != pytest.approx(differ[1].probability, abs=1e-6)


@pytest.mark.parametrize("arch", ["efficientnet_b0", "densenet121"])
def test_other_torchvision_trunks_train_export_and_serve_with_the_guard(
    arch, kermany, tmp_path
) -> None:
    """The capacity levers of the experiment table, through the same training and serving."""
    config = _tiny_recipe("full", kermany, tmp_path, limit=6, arch=arch)
    path = run_training(config)
    payload = read_weights_file(path)
    assert payload["net_config"]["arch"] == arch
    pred = Predictor(path)
    images = [np.random.default_rng(i).random((64, 80), dtype=np.float32) for i in range(2)]
    out = pred.predict(images)
    assert all(0.0 <= p.probability <= 1.0 and p.ood_score >= 0.0 for p in out)
    assert pred.heatmaps(images[:1])[0].shape == (64, 80)
