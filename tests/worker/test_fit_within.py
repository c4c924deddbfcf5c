"""Heatmap SC inputs are scaled down to the configured longest side, keeping aspect."""

from __future__ import annotations

import numpy as np

from worker.stages.outputs import fit_within


def test_large_image_scaled_keeping_aspect_and_values() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((2048, 1024), dtype=np.float32)
    heat = np.zeros_like(image)
    heat[:1024] = 1.0  # top half hot
    small_image, small_heat = fit_within(image, heat, 1024)
    assert small_image.shape == small_heat.shape == (1024, 512)
    assert 0.0 <= small_image.min() and small_image.max() <= 1.0
    assert abs(float(small_image.mean()) - float(image.mean())) < 0.01
    assert small_heat[:500].min() == 1.0 and small_heat[524:].max() == 0.0


def test_small_image_or_zero_limit_untouched() -> None:
    image = np.full((300, 200), 0.5, dtype=np.float32)
    assert fit_within(image, image, 1024)[0] is image
    big = np.zeros((4000, 10), dtype=np.float32)
    assert fit_within(big, big, 0)[0] is big


def test_heatmap_already_at_the_capture_size_is_kept_as_computed() -> None:
    """The single-pass model hands over maps at the capture size: only the image shrinks."""
    import pytest

    from dicom_io.sc import capture_shape

    image = np.full((2000, 1500), 0.25, dtype=np.float32)
    assert capture_shape(image.shape, 1024) == (1024, 768)
    heat = np.random.default_rng(1).random((1024, 768), dtype=np.float32)
    small_image, same_heat = fit_within(image, heat, 1024)
    assert small_image.shape == (1024, 768)
    assert same_heat is heat
    assert capture_shape((7, 3000), 1024) == (2, 1024)  # never an empty side
    assert capture_shape((10, 10), 1024) == (10, 10)  # never scaled up
    with pytest.raises(ValueError):
        capture_shape((10, 10), -1)
