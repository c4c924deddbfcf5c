"""A tiny training run writes a loadable model, checkpoints, and resumes."""

from __future__ import annotations

import numpy as np
import torch

from model.inference import Predictor
from model.train import TrainConfig, run_training


def _config(kermany, tmp_path, epochs: int) -> TrainConfig:
    return TrainConfig(
        data=kermany / "train", work_dir=tmp_path / "work", out_dir=tmp_path / "out",
        name="tiny", version="0.0.0-test", epochs=epochs, batch_size=8, limit=16,
        width=8, blocks="1,1,1,1", input_size=64, val_fraction=0.3, progress=False,
        threads=1,
    )


def test_tiny_run_exports_a_loadable_model_and_resumes(kermany, tmp_path) -> None:
    path = run_training(_config(kermany, tmp_path, 1))
    assert path == tmp_path / "out" / "tiny-0.0.0-test.pt" and path.exists()
    last = torch.load(tmp_path / "work" / "last.pt", weights_only=False)
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
    last = torch.load(tmp_path / "work" / "last.pt", weights_only=False)
    assert last["epoch"] == 1 and len(last["history"]) == 2
    assert last["history"][0] == first_epoch
    payload = torch.load(path, weights_only=False)
    assert payload["training"]["epochs_run"] == 2
