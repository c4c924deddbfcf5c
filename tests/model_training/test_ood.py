"""The not-a-chest-radiograph guard on real non-chest DICOMs it never saw in training.

The files in ``../shared/data/dicom/other`` were *not* used to fit the guard (it is
fitted on Kermany train/validation radiographs only), so this is a real test.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from model.images import load_image_file
from model.inference import load_predictor
from tests.paths import SHARED

# Same pixels as a real NIH chest radiograph (only the header was altered upstream).
CHEST_PIXELS = {"udacity_aihcnd_test4.dcm", "udacity_aihcnd_test5.dcm", "udacity_aihcnd_test6.dcm"}
CAT = "deid_cat_DX_chest.dcm"


def _luminance_of_any_dicom(path) -> np.ndarray | None:
    """The guard check's reader (colour images as their luminance); None when undecodable."""
    from dicom_io.pixels import PixelReadError, read_luminance_file

    try:
        return read_luminance_file(path)
    except PixelReadError:
        return None


# Non-chest files the shipped guard lets through (the model card lists them): none for
# 2.0.0, which flags all 29; 1.0.0 passed a 64x64 MR head (two encodings) and a synthetic
# grey-squares pattern. A file named here is xfail, not hidden.
KNOWN_MISSES: dict[str, str] = {}


def _other_names() -> list[str]:
    index = SHARED / "dicom" / "other" / "index.csv"
    if not index.exists():
        return []
    with open(index, newline="") as f:
        return [row["file"].split("/", 1)[1] for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def other_images(shared):
    pytest.importorskip("dicom_io.pixels", reason="dicom_io.pixels not available")
    folder = shared / "dicom" / "other"
    out = {}
    for name in _other_names():
        img = _luminance_of_any_dicom(folder / name)
        if img is not None and img.ndim == 2 and min(img.shape) >= 8:
            out[name] = img
    return out


@pytest.fixture(scope="module")
def other_predictions(other_images):
    pred = load_predictor()
    return dict(zip(other_images, pred.predict(list(other_images.values())), strict=True))


def test_enough_non_chest_material_is_decodable(other_images) -> None:
    non_chest = set(other_images) - CHEST_PIXELS - {CAT}
    assert len(non_chest) >= 20  # CT, MR, US, NM, photographs, colour images


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_MISSES[n], strict=False))
        if n in KNOWN_MISSES
        else n
        for n in _other_names()
        if n not in CHEST_PIXELS | {CAT}
    ],
)
def test_guard_flags_non_chest_file(shared, other_predictions, name) -> None:
    if name not in other_predictions:  # no image to guard: the reader says why instead
        from dicom_io.pixels import PixelErrorKind, PixelReadError, read_luminance_file

        with pytest.raises(PixelReadError) as refused:
            read_luminance_file(shared / "dicom" / "other" / name)
        assert isinstance(refused.value.kind, PixelErrorKind)
        return
    result = other_predictions[name]
    assert not result.is_chest, f"{name}: ood_score {result.ood_score:.2f} passed the guard"
    assert not result.finding


def test_guard_passes_real_chest_radiographs(shared, other_images, capsys) -> None:
    pred = load_predictor()
    from dicom_io.pixels import read_pixels_file

    cxr = [read_pixels_file(p) for p in sorted((shared / "dicom" / "cxr").glob("*.dcm"))]
    cxr += [other_images[k] for k in sorted(CHEST_PIXELS) if k in other_images]
    jpegs = sorted((shared / "kermany" / "test" / "NORMAL").glob("*.jpeg"))[:10]
    jpegs += sorted((shared / "kermany" / "test" / "PNEUMONIA").glob("*.jpeg"))[:10]
    results = pred.predict(cxr + [load_image_file(p) for p in jpegs])
    flagged = [round(r.ood_score, 2) for r in results if not r.is_chest]
    assert not flagged, f"real chest radiographs flagged as non-chest: {flagged}"
    if CAT in other_images:  # reported, not asserted: a feline thorax is a radiograph too
        cat = pred.predict([other_images[CAT]])[0]
        with capsys.disabled():
            print(
                f"\n[ood] cat DX chest: ood_score={cat.ood_score:.2f} "
                f"(threshold {pred.info.ood_threshold:.2f}) is_chest={cat.is_chest} "
                f"p={cat.probability:.3f}"
            )


def test_guard_statistics_round_trip_through_the_packed_precision() -> None:
    """Weights files keep each precision's upper triangle; older files keep the full matrix."""
    from model.ood import OODModel, fit_ood

    rng = np.random.default_rng(0)
    mix = rng.normal(size=(12, 12))  # correlated features: an off-diagonal precision
    train, val = rng.normal(size=(300, 12)) @ mix, rng.normal(size=(80, 12)) @ mix
    guard = fit_ood(train, val, [4, 8])
    probe = np.vstack([val[:5], val[:5] * 4.0])
    packed = guard.to_dict()
    assert [x["precision_upper"].shape for x in packed["layers"]] == [(10,), (36,)]
    assert "precision" not in packed["layers"][0]
    again = OODModel.from_dict(packed)
    np.testing.assert_allclose(again.score(probe), guard.score(probe), rtol=1e-5)
    for g in again.layers:
        np.testing.assert_array_equal(g.precision, g.precision.T)

    full = {  # a file written before packing (pneumonet-1.0.0 and 2.0.0)
        **packed,
        "layers": [
            {k: v for k, v in x.items() if k != "precision_upper"}
            | {"precision": g.precision.astype(np.float32)}
            for x, g in zip(packed["layers"], guard.layers, strict=True)
        ],
    }
    np.testing.assert_allclose(OODModel.from_dict(full).score(probe), guard.score(probe), rtol=1e-5)
    broken = {**packed, "layers": [{**packed["layers"][0], "stop": 5}]}
    with pytest.raises(ValueError, match="does not fit"):
        OODModel.from_dict(broken)


def test_stage_score_is_the_squared_mahalanobis_distance_per_dimension() -> None:
    """Each row's score is (x - mean)^T P (x - mean) / D, whatever the batch around it."""
    from model.ood import LayerGaussian

    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 6))
    precision = a @ a.T + np.eye(6)  # symmetric positive definite, off-diagonal terms
    g = LayerGaussian(2, 8, rng.normal(size=6), precision, 1.0)
    rows = rng.normal(size=(5, 10))
    expected = [float((r[2:8] - g.mean) @ precision @ (r[2:8] - g.mean)) / 6 for r in rows]
    np.testing.assert_allclose(g.raw_score(rows), expected, rtol=1e-12)
    np.testing.assert_allclose(g.raw_score(rows[3:4]), expected[3:4], rtol=1e-12)
    assert g.raw_score(np.zeros((0, 10))).shape == (0,)
