"""The one preprocessing path from a float [0, 1] image to the model tensor.

Used by training (``model.training_data``/``model.train``), evaluation and the worker
alike, so the network sees exactly the same transform everywhere:

1. :func:`resize_to_input` squash-resizes the whole image to ``INPUT_SIZE`` x
   ``INPUT_SIZE`` (bilinear with anti-aliasing) *without* keeping the aspect
   ratio. The Kermany test split only exists aspect-squashed at 224x224, so
   squashing every image (train, test, DICOM) keeps the geometry identical.
2. :func:`standardize` rescales each image to zero mean and unit variance. This
   makes 8-bit JPEGs, 12/15-bit CR/DX (already windowed to [0, 1] by
   ``dicom_io``) and differently exposed films look alike to the network.
   A model trained with ``equalize`` (its weights file says so) first maps each
   image through its own histogram (:func:`equalize_histogram`): every monotone
   change of grey levels (gamma, contrast curve, window) then gives the same input.

Training applies its augmentations between the two steps (on the resized
[0, 1] image) and then calls :func:`standardize` itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "INPUT_SIZE",
    "equalize_histogram",
    "resize_to_input",
    "standardize",
    "to_model_batch",
    "to_model_tensor",
]

INPUT_SIZE: int = 224
"""Side of the square model input, in pixels."""

_MIN_SIDE = 8
_STD_FLOOR = 1e-3  # a flat image must not blow up to +-inf
_CLAMP = 6.0  # keeps burnt-in text / collimator edges from dominating
_LEVELS = 256  # grey levels of the equalisation histogram (8-bit JPEG and DICOM alike)


def _as_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Validate a 2-D image and return it as a float32 tensor clipped to [0, 1].

    The result may share memory with ``image`` (when it is float32 already in
    [0, 1]): it is read, never modified in place.
    """
    t = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {tuple(t.shape)}")
    if min(t.shape) < _MIN_SIDE:
        raise ValueError(f"image too small for the model: {tuple(t.shape)}")
    if t.dtype == torch.uint8:  # convenience: 8-bit images map 0..255 to [0, 1]
        return t.to(torch.float32) / 255.0
    t = t.to(torch.float32)
    lo, hi = torch.aminmax(t)  # one read-only pass; NaN anywhere makes both NaN
    if lo >= 0.0 and hi <= 1.0:
        # The usual case (dicom_io and the JPEG reader give [0, 1]): the image as it
        # is, shared with the caller, so callers must not modify it in place.
        return t
    # A new tensor (the caller's array is never changed); +-inf clamp to 1 and 0.
    t = t.clamp(0.0, 1.0)
    if torch.isnan(t).any():
        t = torch.nan_to_num_(t, nan=0.0)
    return t


def resize_to_input(image: np.ndarray | torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Squash-resize a 2-D [0, 1] image to a (1, size, size) float32 tensor in [0, 1]."""
    t = _as_tensor(image)
    if t.shape == (size, size):
        return t.unsqueeze(0).clone()
    out = F.interpolate(
        t[None, None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return out[0].clamp_(0.0, 1.0)


def equalize_histogram(x: torch.Tensor) -> torch.Tensor:
    """Histogram-equalise each [0, 1] image over its last two dims (any leading dims).

    Each pixel becomes the mid-rank of its grey level (of :data:`_LEVELS`) in its own
    image, ``(count below + count equal / 2) / pixels``, in (0, 1). Equal grey levels
    stay equal, brighter stays brighter, and any monotone increasing change of the
    grey levels that keeps the levels apart gives the same output.
    """
    flat = x.flatten(-2)
    rows = flat.reshape(-1, flat.shape[-1])
    n, pixels = rows.shape
    level = (rows.clamp(0.0, 1.0) * (_LEVELS - 1)).round_().long()
    offset = level + torch.arange(n, device=x.device).unsqueeze(1) * _LEVELS
    hist = torch.bincount(offset.flatten(), minlength=n * _LEVELS).reshape(n, _LEVELS)
    hist = hist.to(torch.float32)
    mid_rank = (hist.cumsum(-1) - hist / 2) / pixels
    return torch.gather(mid_rank, 1, level).reshape(x.shape)


def standardize(x: torch.Tensor, *, equalize: bool = False) -> torch.Tensor:
    """Per-image zero mean / unit variance over the last two dims (any leading dims).

    ``equalize``: :func:`equalize_histogram` the [0, 1] images first.
    """
    if equalize:
        x = equalize_histogram(x)
    flat = x.flatten(-2)
    mean = flat.mean(-1, keepdim=True).unsqueeze(-1)
    std = flat.std(-1, keepdim=True).unsqueeze(-1).clamp_min(_STD_FLOOR)
    return ((x - mean) / std).clamp_(-_CLAMP, _CLAMP)


def to_model_tensor(
    image: np.ndarray | torch.Tensor, size: int = INPUT_SIZE, *, equalize: bool = False
) -> torch.Tensor:
    """From a 2-D float [0, 1] image to the (1, S, S) float32 model tensor."""
    return standardize(resize_to_input(image, size), equalize=equalize)


def to_model_batch(
    images: Sequence[np.ndarray | torch.Tensor], size: int = INPUT_SIZE, *, equalize: bool = False
) -> torch.Tensor:
    """Stack :func:`to_model_tensor` of each image into an (N, 1, S, S) batch."""
    if len(images) == 0:
        return torch.empty((0, 1, size, size), dtype=torch.float32)
    return torch.stack([to_model_tensor(im, size, equalize=equalize) for im in images])
