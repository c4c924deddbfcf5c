"""model.shift: the acquisition perturbations behind the shift-robust validation view."""

from __future__ import annotations

import numpy as np
import pytest

from model.shift import Perturbation, apply, perturb, perturbed_view


def _stack(n: int = 6, size: int = 64) -> np.ndarray:
    """Smooth radiograph-like images: a bright body with two darker 'lungs'."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 0.8 - 0.5 * np.exp(-(((xx - 0.3) ** 2 + (yy - 0.5) ** 2) / 0.02))
    base -= 0.5 * np.exp(-(((xx - 0.7) ** 2 + (yy - 0.5) ** 2) / 0.02))
    rng = np.random.default_rng(1)
    imgs = [np.clip(base + 0.05 * rng.standard_normal(base.shape), 0, 1) for _ in range(n)]
    return np.round(np.stack(imgs) * 255).astype(np.uint8)


def test_perturbed_view_is_deterministic_for_a_seed() -> None:
    pixels = _stack()
    a, b = perturbed_view(pixels, seed=7), perturbed_view(pixels, seed=7)
    assert a.shape == pixels.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, perturbed_view(pixels, seed=8))  # the seed matters
    assert np.array_equal(pixels, _stack())  # the input is left alone


def test_perturbed_view_of_an_image_does_not_depend_on_what_follows_it() -> None:
    pixels = _stack()
    assert np.array_equal(perturbed_view(pixels, 3)[:2], perturbed_view(pixels[:2], 3))


def test_perturbed_view_changes_every_image_but_keeps_it_an_image() -> None:
    pixels = _stack(12)
    view = perturbed_view(pixels, seed=0)
    diff = np.abs(view.astype(int) - pixels.astype(int)).mean(axis=(1, 2))
    assert (diff > 1.0).all()  # every image perturbed visibly...
    corr = [np.corrcoef(v.ravel(), p.ravel())[0, 1] for v, p in zip(view, pixels, strict=True)]
    assert min(corr) > 0.3  # ...yet still the same picture


@pytest.mark.parametrize("kind", list(Perturbation))
def test_each_perturbation_changes_the_image_and_keeps_shape(kind: Perturbation) -> None:
    img = _stack(1)[0]
    out = apply(img, kind, np.random.default_rng(0))
    assert out.shape == img.shape and out.dtype == np.uint8
    assert not np.array_equal(out, img), kind


def test_strength_scales_how_far_an_image_moves() -> None:
    img = _stack(1)[0].astype(int)
    mild = [
        np.abs(perturb(img.astype(np.uint8), np.random.default_rng(s), (1, 1), 0.1) - img).mean()
        for s in range(20)
    ]
    strong = [
        np.abs(perturb(img.astype(np.uint8), np.random.default_rng(s), (1, 1), 1.0) - img).mean()
        for s in range(20)
    ]
    assert np.mean(mild) < np.mean(strong)


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ValueError, match="img"):
        apply(np.zeros((4, 4, 3), np.uint8), Perturbation.GAMMA, np.random.default_rng(0))
    with pytest.raises(ValueError, match="pixels"):
        perturbed_view(np.zeros((4, 4), np.uint8))
