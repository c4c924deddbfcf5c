"""``pneumo evaluate`` with the shipped weights, end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from model.metrics import METRIC_NAMES, compute_metrics


@pytest.fixture(scope="module")
def shipped() -> Path:
    inference = pytest.importorskip("model.inference")
    try:
        return inference.default_weights_path()
    except inference.WeightsError:
        pytest.skip("no shipped weights yet")


def _pneumo(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process (the predictor is cached across tests)."""
    from pneumo.cli import main

    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_evaluate_json_and_out_dir(
    shipped: Path, small_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from model.inference import load_predictor

    out = tmp_path / "report"
    code, stdout, stderr = _pneumo(
        capsys,
        "evaluate",
        "--data",
        str(small_tree),
        "--model",
        str(shipped),
        "--format",
        "json",
        "--out",
        str(out),
        "--bootstrap",
        "200",
    )
    assert code == 0, stderr
    payload = json.loads(stdout)  # stdout is exactly one JSON object
    for name in METRIC_NAMES:
        assert set(payload[name]) == {"value", "ci95"}, name
    info = load_predictor(shipped).info
    assert payload["model_version"] == info.version
    assert payload["model_sha256"] == info.sha256
    assert payload["threshold"] == pytest.approx(info.threshold)
    # 15 files: one broken JPEG and one 4-pixel strip can never be scored.
    assert payload["n_total"] == 15
    assert payload["not_processed"]["unreadable"] == 1
    assert payload["not_processed"]["rejected by the model's input checks"] == 1
    assert payload["n"] + payload["n_not_processed"] == 15
    assert json.loads((out / "metrics.json").read_text()) == payload

    # The printed metrics are compute_metrics over the scored rows of predictions.csv.
    with (out / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 15
    scored = [r for r in rows if not r["not_processed"]]
    assert len(scored) == payload["n"]
    labels = [int(r["label"]) for r in scored]
    probs = [float(r["probability"]) for r in scored]
    if 0 < sum(labels) < len(labels):
        expected = compute_metrics(labels, probs, payload["threshold"], n_bootstrap=200)
        for name in METRIC_NAMES:
            assert payload[name]["value"] == pytest.approx(expected[name].value, abs=2e-6), name
    # The same images through the Python API give the same probabilities.
    from model.images import load_image_file

    first = next(r for r in scored)
    direct = load_predictor(shipped).predict([load_image_file(small_tree / first["path"])])[0]
    assert float(first["probability"]) == pytest.approx(direct.probability, abs=1e-5)
    assert {p.name for p in out.glob("*.png")} >= {"confusion_matrix.png", "reliability.png"}


def test_evaluate_npz_table(
    shipped: Path, mnist_npz: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, stderr = _pneumo(
        capsys,
        "evaluate",
        "--data",
        str(mnist_npz),
        "--split",
        "val",
        "--limit",
        "40",
        "--bootstrap",
        "50",
        "--model",
        str(shipped),
    )
    assert code in (0, 1), stderr
    assert "pneumoniamnist:val" in stdout
    assert "of 40" in stdout


def test_evaluate_reports_unreadable_dicom(
    shipped: Path,
    other_dicom: Path,
    cxr_dicom: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A folder of DICOMs: broken ones are listed as unreadable, nothing crashes."""
    import shutil

    root = tmp_path / "dcm"
    (root / "NORMAL").mkdir(parents=True)
    (root / "PNEUMONIA").mkdir()
    shutil.copy(cxr_dicom / "udacity_aihcnd_test1.dcm", root / "NORMAL" / "cxr.dcm")
    shutil.copy(other_dicom / "MR_truncated.dcm", root / "PNEUMONIA" / "truncated.dcm")
    shutil.copy(other_dicom / "CT_small.dcm", root / "PNEUMONIA" / "ct.dcm")
    out = tmp_path / "out"
    code, stdout, stderr = _pneumo(
        capsys,
        "evaluate",
        "--data",
        str(root),
        "--model",
        str(shipped),
        "--out",
        str(out),
        "--format",
        "json",
        "--bootstrap",
        "0",
    )
    assert code in (0, 1), stderr
    assert json.loads(stdout)["n_total"] == 3
    with (out / "predictions.csv").open() as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    assert rows["PNEUMONIA/truncated.dcm"]["not_processed"].startswith("unreadable")
    assert rows["PNEUMONIA/truncated.dcm"]["probability"] == ""
    assert rows["NORMAL/cxr.dcm"]["probability"] != ""
    assert np.isfinite(float(rows["NORMAL/cxr.dcm"]["ood_score"]))


@pytest.mark.slow
def test_shipped_weights_reproduce_the_model_card(shipped: Path, kermany_test: Path) -> None:
    """The card's kermany/test figures are what the shipped file gives today (AUC within 0.002)."""
    from model.evaluation import evaluate
    from model.evaluation_sets import folder_dataset
    from model.inference import load_predictor

    card_path = shipped.with_suffix(".json")
    if not card_path.is_file():
        pytest.skip(f"no model card beside {shipped.name} yet")
    card = json.loads(card_path.read_text())
    predictor = load_predictor(shipped)
    assert card["sha256"] == predictor.info.sha256, "the card describes another weights file"
    recorded = card["evaluations"]["kermany/test"]
    result = evaluate(predictor, folder_dataset(kermany_test), n_bootstrap=0, batch_size=64)
    assert result.n == recorded["n"]
    assert result.metrics is not None
    assert abs(result.metrics["roc_auc"].value - recorded["roc_auc"]["value"]) <= 0.002
    for name in ("sensitivity", "specificity", "accuracy"):
        assert result.metrics[name].value == pytest.approx(recorded[name]["value"], abs=0.01)
