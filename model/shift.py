"""Acquisition-like image perturbations: the one home of "what a new site looks like".

The patient-level validation split of ``kermany/train`` is too easy (AUC ~0.995)
for choices made on it to transfer to ``kermany/test`` or to a hospital's PACS.
The images differ between sources mostly in how they were *acquired and
processed*, not in anatomy: contrast curves and gamma, edge enhancement or
softness, noise, lossy re-compression, resampling, collimation/cropping,
burned-in markers and the display window. This module defines those
perturbations once and is used twice:

* :func:`perturbed_view` builds the shift-robust validation view -- every
  validation image under a few perturbations drawn from a seeded generator, so
  the view is identical for a seed and every candidate is compared on the same
  images;
* :func:`perturb` is called by training (``model.train``) on a random part of
  each batch, so the network learns to ignore the same nuisances.

Everything works on 2-D ``uint8`` arrays at the model's input size (the pixel
cache of ``model.training_data``), in numpy and Pillow only, and never reads labels.
"""

from __future__ import annotations

import enum
import io

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["Perturbation", "apply", "perturb", "perturbed_view"]

U8 = NDArray[np.uint8]
F32 = NDArray[np.float32]


class Perturbation(str, enum.Enum):
    """One kind of acquisition/processing difference between sites."""

    GAMMA = "gamma"
    """Power-law tone curve (exposure / detector response)."""
    CONTRAST_CURVE = "contrast-curve"
    """Sigmoid tone curve: the S-shaped look-up tables of vendor post-processing."""
    BLUR = "blur"
    """Gaussian softening (older detectors, motion, heavy noise reduction)."""
    SHARPEN = "sharpen"
    """Unsharp masking (edge enhancement of CR/DX processing)."""
    NOISE = "noise"
    """Additive Gaussian quantum/electronic noise."""
    JPEG = "jpeg"
    """Lossy JPEG re-compression at a low quality (teleradiology, exports)."""
    RESAMPLE = "resample"
    """Down- then up-sampling (images stored or sent at lower resolution)."""
    BORDER_CROP = "border-crop"
    """Collimation or a tighter crop, resized back to the full frame."""
    TEXT_MARKER = "text-marker"
    """Burned-in side markers and annotations (``L``, ``R``, ``PORTABLE``, dates)."""
    WINDOW = "window"
    """A different display window (clipped or compressed intensity range)."""


_MARKERS = ("L", "R", "AP", "PA", "PORTABLE", "SUPINE", "ERECT", "12:04", "2019")


def _to_float(img: U8) -> F32:
    return img.astype(np.float32) / 255.0


def _to_u8(x: F32) -> U8:
    result: U8 = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    return result


def apply(img: U8, kind: Perturbation, rng: np.random.Generator, strength: float = 1.0) -> U8:
    """``img`` (2-D uint8) under one perturbation with parameters drawn from ``rng``.

    ``strength`` in (0, 1] scales how far each parameter may stray from identity.

    Raises:
        ValueError: ``img`` is not a 2-D uint8 array.
    """
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"img: expected a 2-D uint8 array, got {img.dtype} {img.shape}")
    s = float(strength)
    h, w = img.shape
    if kind is Perturbation.GAMMA:
        g = float(np.exp(rng.uniform(-0.6, 0.6) * s))
        return _to_u8(_to_float(img) ** g)
    if kind is Perturbation.CONTRAST_CURVE:
        k = 1.0 + rng.uniform(2.0, 8.0) * s
        c = 0.5 + rng.uniform(-0.15, 0.15) * s
        x = _to_float(img)
        lo, hi = 1 / (1 + np.exp(k * c)), 1 / (1 + np.exp(-k * (1 - c)))
        y = (1 / (1 + np.exp(-k * (x - c))) - lo) / (hi - lo)
        return _to_u8(y.astype(np.float32))
    if kind is Perturbation.BLUR:
        radius = rng.uniform(0.6, 0.6 + 1.6 * s)
        return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))
    if kind is Perturbation.SHARPEN:
        mask = ImageFilter.UnsharpMask(
            radius=float(rng.uniform(1.0, 3.0)),
            percent=int(rng.uniform(60, 60 + 180 * s)),
            threshold=0,
        )
        return np.asarray(Image.fromarray(img).filter(mask))
    if kind is Perturbation.NOISE:
        sigma = rng.uniform(0.01, 0.01 + 0.05 * s)
        noise = rng.standard_normal(img.shape).astype(np.float32) * np.float32(sigma)
        return _to_u8(_to_float(img) + noise)
    if kind is Perturbation.JPEG:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(rng.uniform(60 - 50 * s, 60)))
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))
    if kind is Perturbation.RESAMPLE:
        f = rng.uniform(min(1.0 - 0.65 * s, 0.9), 0.9)
        small = Image.fromarray(img).resize(
            (max(8, int(w * f)), max(8, int(h * f))), Image.Resampling.BILINEAR
        )
        return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR))
    if kind is Perturbation.BORDER_CROP:
        t, b, le, r = (int(rng.uniform(0, 0.12 * s) * n) for n in (h, h, w, w))
        crop = Image.fromarray(img[t : h - b, le : w - r])
        out = np.asarray(crop.resize((w, h), Image.Resampling.BILINEAR)).copy()
        if rng.random() < 0.5:  # collimator shadow: a dark band on one side
            band = int(rng.uniform(0.02, 0.02 + 0.08 * s) * w)
            side = int(rng.integers(4))
            sl = [np.s_[:band, :], np.s_[h - band :, :], np.s_[:, :band], np.s_[:, w - band :]]
            out[sl[side]] = (out[sl[side]] * rng.uniform(0.0, 0.3)).astype(np.uint8)
        return out
    if kind is Perturbation.TEXT_MARKER:
        pil = Image.fromarray(img)
        draw = ImageDraw.Draw(pil)
        for _ in range(int(rng.integers(1, 4))):
            text = _MARKERS[int(rng.integers(len(_MARKERS)))]
            x0, y0 = int(rng.uniform(0, 0.8) * w), int(rng.uniform(0, 0.9) * h)
            fill = int(rng.choice([255, 230, 0]))
            if rng.random() < 0.3:  # boxed lead marker
                draw.rectangle([x0, y0, x0 + 14, y0 + 16], outline=fill)
            draw.text((x0 + 2, y0 + 2), text, fill=fill, font_size=float(rng.uniform(9, 18)))
        return np.asarray(pil)
    if kind is Perturbation.WINDOW:
        lo = rng.uniform(-0.15, 0.15) * s
        hi = 1.0 + rng.uniform(-0.15, 0.15) * s
        return _to_u8((_to_float(img) - np.float32(lo)) / np.float32(hi - lo))
    raise ValueError(f"kind: unknown perturbation {kind!r}")  # pragma: no cover


def perturb(
    img: U8, rng: np.random.Generator, count: tuple[int, int] = (1, 3), strength: float = 1.0
) -> U8:
    """``img`` under ``count[0]..count[1]`` distinct random perturbations, in random order."""
    kinds = list(Perturbation)
    n = int(rng.integers(count[0], count[1] + 1))
    for i in rng.permutation(len(kinds))[:n]:
        img = apply(img, kinds[int(i)], rng, strength)
    return img


def perturbed_view(pixels: U8, seed: int = 0) -> U8:
    """The shift-robust validation view of an (N, S, S) uint8 stack; same seed, same view.

    Each image gets its own generator derived from ``(seed, index)``, so the view of an
    image does not depend on which other images are in the stack's prefix order.
    """
    if pixels.ndim != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"pixels: expected (N, S, S) uint8, got {pixels.dtype} {pixels.shape}")
    out = np.empty_like(pixels)
    for i, img in enumerate(pixels):
        rng = np.random.default_rng([seed, i])
        out[i] = perturb(img, rng, count=(2, 3))
    return out
