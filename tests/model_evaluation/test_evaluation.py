"""model.evaluation_sets + model.evaluation + model.plots on real files, with a checkable predictor."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.evaluation import (
    NotProcessed,
    evaluate,
    format_table,
    read_predictions_csv,
    write_outputs,
)
from model.evaluation_sets import (
    DatasetError,
    ItemKind,
    folder_dataset,
    npz_dataset,
    open_dataset,
    stratified_subset,
)
from model.images import load_image_file
from model.inference import NOT_CHEST_CODE
from model.metrics import METRIC_NAMES, compute_metrics
from model.plots import PLOT_FILES


def test_folder_dataset_lists_and_labels_files(small_tree: Path) -> None:
    ds = folder_dataset(small_tree)
    refs = [item.ref for item in ds]
    assert ".hidden.jpeg" not in " ".join(refs)
    assert ds.class_counts() == {"NORMAL": 7, "PNEUMONIA": 8}
    assert all(item.label == (1 if item.ref.startswith("PNEUMONIA/") else 0) for item in ds)
    first = ds.items[0]
    np.testing.assert_array_equal(ds.load(first), load_image_file(first.path))


def test_evaluate_excludes_and_reports_not_processed(
    small_tree: Path, tmp_path: Path, predictor_cls: type
) -> None:
    predictor = predictor_cls()
    ds = folder_dataset(small_tree)
    result = evaluate(predictor, ds, n_bootstrap=200, batch_size=5)

    by_ref = {r.ref: r for r in result.records}
    assert len(result.records) == len(ds)  # nothing lost
    assert by_ref["NORMAL/broken.jpeg"].not_processed is NotProcessed.UNREADABLE
    assert by_ref["PNEUMONIA/strip.png"].not_processed is NotProcessed.REJECTED
    assert by_ref["PNEUMONIA/banner.png"].not_processed is NotProcessed.NOT_CHEST
    assert result.n == 12
    assert result.not_processed_counts() == {
        "unreadable": 1,
        "rejected by the model's input checks": 1,
        "not-chest-xray": 1,  # the worker's code (model.inference.NOT_CHEST_CODE)
    }
    assert NotProcessed.NOT_CHEST.value == NOT_CHEST_CODE == "not-chest-xray"

    # The metrics are exactly compute_metrics over the scored images, recomputed here
    # from the images themselves with the predictor's rule.
    scored = [item for item in ds if by_ref[item.ref].scored]
    probs = [predictor.predict([ds.load(item)])[0].probability for item in scored]
    expected = compute_metrics([item.label for item in scored], probs, 0.5, n_bootstrap=200)
    assert result.metrics == expected

    out = tmp_path / "out"
    write_outputs(result, out)
    payload = json.loads((out / "metrics.json").read_text())
    for name in METRIC_NAMES:
        assert set(payload[name]) == {"value", "ci95"} and len(payload[name]["ci95"]) == 2
    assert payload["n"] == 12 and payload["n_not_processed"] == 3
    assert payload["threshold"] == 0.5 and payload["model_version"] == "0.0.0"
    rows = read_predictions_csv(out / "predictions.csv")
    assert [r.ref for r in rows] == [item.ref for item in ds]  # dataset order, every file
    assert rows[0].probability == pytest.approx(result.records[0].probability, abs=1e-6)
    assert {r.not_processed for r in rows} == {None, *NotProcessed}
    for name in PLOT_FILES:
        with Image.open(out / name) as img:
            assert img.width > 300 and img.height > 300, name
            # A blank canvas would be one colour; a plot has many.
            assert len(img.convert("RGB").getcolors(1 << 20) or []) > 20, name

    table = format_table(result)
    assert "scored    12 of 15" in table
    assert "1 not a chest radiograph" in table


def test_bad_image_in_a_batch_loses_only_itself(small_tree: Path, predictor_cls: type) -> None:
    predictor = predictor_cls()
    result = evaluate(predictor, folder_dataset(small_tree), n_bootstrap=0, batch_size=64)
    rejected = [r for r in result.records if r.not_processed is NotProcessed.REJECTED]
    assert [r.ref for r in rejected] == ["PNEUMONIA/strip.png"]
    assert "too small" in rejected[0].reason


def test_nothing_scorable_gives_no_metrics(tmp_path: Path, predictor_cls: type) -> None:
    root = tmp_path / "bad"
    (root / "NORMAL").mkdir(parents=True)
    (root / "NORMAL" / "a.png").write_bytes(b"not an image")
    result = evaluate(predictor_cls(), folder_dataset(root), n_bootstrap=10)
    assert result.metrics is None and result.n == 0
    payload = result.to_json()
    json.dumps(payload, allow_nan=False)
    assert payload["roc_auc"] == {"value": None, "ci95": [None, None]}
    assert "no metrics" in format_table(result)


def test_dicom_files_go_through_the_injected_reader(
    tmp_path: Path, cxr_dicom: Path, predictor_cls: type
) -> None:
    from dicom_io.pixels import read_pixels_file

    source = cxr_dicom / "udacity_aihcnd_test1.dcm"
    root = tmp_path / "dcm"
    (root / "NORMAL").mkdir(parents=True)
    shutil.copy(source, root / "NORMAL" / "one.dcm")
    shutil.copy(source, root / "NORMAL" / "no_suffix")  # sniffed by its DICM magic
    calls: list[Path] = []

    def reader(path: Path) -> np.ndarray:
        calls.append(path)
        return read_pixels_file(path)

    ds = folder_dataset(root, read_dicom=reader)
    assert [item.kind for item in ds] == [ItemKind.DICOM, ItemKind.DICOM]
    image = ds.load(ds.items[0])
    assert image.dtype == np.float32 and image.ndim == 2 and 0 <= image.min() < image.max() <= 1
    result = evaluate(predictor_cls(), ds, n_bootstrap=0)
    assert len(calls) == 3 and result.n == 2
    # Only normals: sensitivity / AUC are undefined, specificity is not.
    assert math.isnan(result.metrics["roc_auc"].value)
    assert not math.isnan(result.metrics["specificity"].value)
    # Without a reader the DICOM is reported, not crashed on.
    result = evaluate(predictor_cls(), folder_dataset(root), n_bootstrap=0)
    assert {r.not_processed for r in result.records} == {NotProcessed.UNREADABLE}


def test_npz_dataset_and_stratified_subset(mnist_npz: Path) -> None:
    path = mnist_npz
    with np.load(path) as npz:
        labels = npz["test_labels"].reshape(-1)
        first = npz["test_images"][0]
    ds = npz_dataset(path, "test")
    assert len(ds) == labels.size
    np.testing.assert_array_equal(ds.labels, labels)
    np.testing.assert_allclose(ds.load(ds.items[0]), first / 255.0, atol=1e-7)
    sub = stratified_subset(ds, 50, seed=3)
    assert len(sub) == 50
    assert abs(sub.labels.mean() - labels.mean()) < 0.03
    assert stratified_subset(ds, 50, seed=3).items == sub.items
    assert open_dataset(path, split="val").name.endswith(":val")
    with pytest.raises(DatasetError, match="unknown split"):
        npz_dataset(path, "holdout")


def test_dataset_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="neither a NORMAL"):
        folder_dataset(tmp_path)
    (tmp_path / "NORMAL").mkdir()
    with pytest.raises(DatasetError, match="no files"):
        folder_dataset(tmp_path)
    with pytest.raises(DatasetError, match="neither a folder"):
        open_dataset(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, other=np.zeros(3))
    with pytest.raises(DatasetError, match="no test_images"):
        npz_dataset(bad)


def test_plots_skip_curves_that_need_both_classes(tmp_path: Path) -> None:
    from model.plots import save_all_plots

    written = save_all_plots(np.zeros(20, dtype=int), np.linspace(0, 1, 20), 0.5, tmp_path)
    names = {p.name for p in written}
    assert names == set(PLOT_FILES) - {"roc.png", "pr.png"}
    assert all(p.stat().st_size > 5000 for p in written)
