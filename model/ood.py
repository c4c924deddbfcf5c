"""Not-a-chest-radiograph guard: Mahalanobis distances in the network's feature space.

Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples
and Adversarial Attacks" (NeurIPS 2018): for each ResNet stage, fit a Gaussian
(one mean, shrunk covariance) to the per-channel mean and standard deviation of
that stage's output over the *training* chest radiographs. An image's score at a
stage is its squared Mahalanobis distance divided by the feature dimension and by
the 99.5th percentile of the *validation* radiographs' scores at that stage; the
OOD score is the maximum over stages (early stages see texture and intensity
statistics, late ones anatomy). The threshold is ``margin`` x the ``quantile`` of
validation OOD scores.

Non-chest DICOMs in the shared data are kept for *testing* the guard; nothing
non-chest is used to fit it. :func:`non_chest_reference_images` provides synthetic
and PyPI-shipped images to check it during development.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["LayerGaussian", "OODModel", "fit_ood", "non_chest_reference_images"]

_LAYER_QUANTILE = 0.995


@dataclass(frozen=True)
class LayerGaussian:
    start: int  # slice of the feature vector this stage occupies
    stop: int
    mean: np.ndarray  # (D,)
    precision: np.ndarray  # (D, D) inverse of the shrunk covariance
    scale: float  # normaliser: validation quantile of this stage's raw score

    def raw_score(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each row over this stage's slice, per dimension."""
        f = torch.as_tensor(
            np.asarray(features, dtype=np.float64)[:, self.start : self.stop] - self.mean
        )
        # (f P) row-wise dot f as one matrix product. A three-operand einsum loops
        # without BLAS (1.7 ms per image at the 1024-wide stage); numpy's own BLAS
        # starts a thread pool of its own that fights torch's for the cores (a
        # batch-1 predict() took about 3x as long), so the product runs in torch.
        product = (f @ torch.as_tensor(self.precision)) * f
        result: np.ndarray = product.sum(dim=1).numpy() / self.mean.size
        return result


@dataclass(frozen=True)
class OODModel:
    layers: tuple[LayerGaussian, ...]
    threshold: float

    def score(self, features: np.ndarray) -> np.ndarray:
        """Per-row OOD score, shape (N,): max over stages of the normalised distance."""
        f = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if f.shape[0] == 0:
            return np.zeros(0)
        result: np.ndarray = np.max([g.raw_score(f) / g.scale for g in self.layers], axis=0)
        return result

    def recentred(
        self, features: np.ndarray, *, quantile: float = 0.995, margin: float = 1.25
    ) -> OODModel:
        """The guard re-normalised on a new site's images (label-free adaptation).

        Each stage's mean and score scale, and the threshold, are re-estimated
        on ``features`` (the site's radiographs through the re-normalised
        network) by the rules :func:`fit_ood` used on validation; the learned
        covariance shape (precision) is kept. Without this, re-estimating the
        network's BatchNorm statistics moves every feature and the guard,
        still centred on the training site, turns the site's radiographs away.

        Raises:
            ValueError: fewer than 2 feature rows.
        """
        f = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if f.shape[0] < 2:
            raise ValueError("features: need at least 2 images to re-centre the guard")
        layers = []
        for g in self.layers:
            centred = LayerGaussian(
                g.start, g.stop, f[:, g.start : g.stop].mean(0), g.precision, 1.0
            )
            scale = float(np.quantile(centred.raw_score(f), _LAYER_QUANTILE)) or 1.0
            layers.append(LayerGaussian(g.start, g.stop, centred.mean, g.precision, scale))
        model = OODModel(tuple(layers), float("inf"))
        return OODModel(model.layers, float(np.quantile(model.score(f), quantile)) * margin)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "per-stage-mahalanobis-max",
            "threshold": float(self.threshold),
            "layers": [
                {
                    "start": g.start,
                    "stop": g.stop,
                    "mean": g.mean.astype(np.float32),
                    # symmetric: its upper triangle, row by row, is the whole of it
                    # (EfficientNet-B0's last stage alone would take 26 MB in full)
                    "precision_upper": g.precision[np.triu_indices(g.mean.size)].astype(np.float32),
                    "scale": float(g.scale),
                }
                for g in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OODModel:
        """The guard a weights file holds (pneumonet-1.0.0 and 2.0.0 hold full ``precision``)."""
        layers = tuple(
            LayerGaussian(
                int(x["start"]),
                int(x["stop"]),
                np.asarray(x["mean"], np.float64),
                _precision(x),
                float(x["scale"]),
            )
            for x in d["layers"]
        )
        return cls(layers, float(d["threshold"]))


def _precision(layer: dict[str, Any]) -> np.ndarray:
    """A stage's (D, D) precision matrix, from its full form or its packed upper triangle."""
    if "precision" in layer:
        return np.asarray(layer["precision"], np.float64)
    dim = int(layer["stop"]) - int(layer["start"])
    upper = np.asarray(layer["precision_upper"], np.float64)
    if upper.shape != (dim * (dim + 1) // 2,):
        raise ValueError(f"ood: a packed precision of {upper.size} values does not fit {dim}")
    full = np.zeros((dim, dim))
    full[np.triu_indices(dim)] = upper
    return full + np.triu(full, 1).T


def _gaussian(x: np.ndarray, shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(0)
    cov = np.cov(x - mean, rowvar=False)
    target = np.eye(cov.shape[0]) * np.trace(cov) / cov.shape[0]
    cov = (1.0 - shrinkage) * cov + shrinkage * target
    return mean, np.linalg.pinv(cov, hermitian=True)


def fit_ood(
    train_features: np.ndarray,
    val_features: np.ndarray,
    layer_dims: Sequence[int],
    *,
    quantile: float = 0.995,
    margin: float = 1.25,
    shrinkage: float = 0.05,
) -> OODModel:
    """Fit per-stage Gaussians on training features, normalise and threshold on validation."""
    tr = np.asarray(train_features, dtype=np.float64)
    va = np.asarray(val_features, dtype=np.float64)
    if sum(layer_dims) != tr.shape[1]:
        raise ValueError(f"layer dims {list(layer_dims)} do not add up to {tr.shape[1]}")
    layers = []
    start = 0
    for dim in layer_dims:
        mean, prec = _gaussian(tr[:, start : start + dim], shrinkage)
        g = LayerGaussian(start, start + dim, mean, prec, 1.0)
        scale = float(np.quantile(g.raw_score(va), _LAYER_QUANTILE)) or 1.0
        layers.append(LayerGaussian(start, start + dim, mean, prec, scale))
        start += dim
    model = OODModel(tuple(layers), float("inf"))
    thr = float(np.quantile(model.score(va), quantile)) * margin
    return OODModel(model.layers, thr)


def non_chest_reference_images(seed: int = 0) -> dict[str, np.ndarray]:
    """Non-chest material for *checking* the guard (never for fitting it).

    Synthetic images (noise, gradients, shapes, a head-CT-like ellipse phantom,
    text-like stripes, blank) and sample images shipped inside installed PyPI
    packages (matplotlib's photo and MR slice, scikit-learn's photos and digits,
    terrain maps). Nothing is downloaded. Returns name -> 2-D float32 [0, 1].
    """
    rng = np.random.default_rng(seed)
    s = 256
    yy, xx = np.mgrid[0:s, 0:s] / (s - 1)
    out: dict[str, np.ndarray] = {
        "synthetic/uniform-noise": rng.random((s, s)),
        "synthetic/gaussian-blobs": _blobs(rng, s),
        "synthetic/horizontal-gradient": xx,
        "synthetic/radial-gradient": 1 - np.hypot(xx - 0.5, yy - 0.5) * 1.4,
        "synthetic/checkerboard": ((np.floor(xx * 8) + np.floor(yy * 8)) % 2),
        "synthetic/stripes": 0.5 + 0.5 * np.sin(yy * 60),
        "synthetic/black": np.zeros((s, s)),
        "synthetic/white-with-dot": np.where(np.hypot(xx - 0.5, yy - 0.5) < 0.1, 0.0, 1.0),
        "synthetic/ct-phantom": _phantom(s),
    }
    out.update(_package_images())
    return {k: np.clip(np.asarray(v, np.float32), 0, 1) for k, v in out.items()}


def _blobs(rng: np.random.Generator, s: int) -> np.ndarray:
    yy, xx = np.mgrid[0:s, 0:s] / (s - 1)
    img = np.zeros((s, s))
    for _ in range(12):
        cx, cy, r = rng.random(), rng.random(), 0.03 + 0.15 * rng.random()
        img += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    result: np.ndarray = img / img.max()
    return result


def _phantom(s: int) -> np.ndarray:
    """A head-CT-like slice: bright skull ring, grey brain, dark ventricles, black air."""
    yy, xx = (np.mgrid[0:s, 0:s] / (s - 1) - 0.5) * 2
    r = np.hypot(xx / 0.7, yy / 0.9)
    img = np.where(r < 1.0, 1.0, 0.0)
    img = np.where(r < 0.92, 0.45, img)
    for cx in (-0.15, 0.15):
        img = np.where(np.hypot((xx - cx) / 0.08, (yy + 0.05) / 0.25) < 1, 0.2, img)
    return img


def _package_images() -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    try:
        import matplotlib.cbook as cbook
        from PIL import Image

        photo = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        with Image.open(photo) as im:
            out["matplotlib/grace_hopper-photo"] = np.asarray(im.convert("L")) / 255.0
        path = cbook.get_sample_data("s1045.ima.gz", asfileobj=False)
        import gzip

        with gzip.open(path) as f:  # a 256x256 16-bit MR slice of a head
            mr = np.frombuffer(f.read(), np.uint16).reshape((256, 256)).astype(np.float64)
        out["matplotlib/mr-head-slice"] = mr / max(float(mr.max()), 1.0)
        dem = np.load(cbook.get_sample_data("jacksboro_fault_dem.npz", asfileobj=False))
        elev = np.asarray(dem["elevation"], np.float64)
        out["matplotlib/terrain-dem"] = (elev - elev.min()) / max(float(np.ptp(elev)), 1e-6)
    except Exception:  # optional material: the check runs with what is available
        pass
    try:
        from sklearn.datasets import load_digits, load_sample_images

        for name, img in zip(("china", "flower"), load_sample_images().images, strict=True):
            out[f"sklearn/{name}-photo"] = (img @ np.array([0.299, 0.587, 0.114])) / 255.0
        digit = load_digits().images[0]
        out["sklearn/digit-8x8"] = np.kron(digit / 16.0, np.ones((8, 8)))
    except Exception:
        pass
    return out
