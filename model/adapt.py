"""Label-free site adaptation: a new model version fitted to a site's *unlabelled* images.

Two things about a new site can be estimated without any label (issue 12):

* **Normalisation statistics** (AdaBN, Li et al. 2016): every BatchNorm layer's
  running mean and variance are re-estimated on the site's images, so the
  network's intermediate features are standardised as they were for the training
  site. Nothing learned (convolutions, BN scale/shift, head) changes.
* **Class prior** (optional; Saerens, Latinne & Decaestecker, Neural Computation
  2002): the share of pneumonia at the site, by expectation-maximisation on the
  calibrated probabilities. The calibration bias moves by
  ``logit(site prior) - logit(training prior)`` and the operating threshold moves
  by the same amount in logit space, so the *decisions* (and the sensitivity the
  threshold was chosen for) are those of the re-normalised network; only the
  probabilities reported say how likely pneumonia is at this site.

Use a few hundred images: BatchNorm statistics from a few dozen are noisy enough
to move decisions, and the EM prior is only as good as the calibration at the site
(on ``kermany/test`` the 1.0.0 model is over-confident, and EM over-estimates the
pneumonia share). The not-a-chest guard's statistics are normalisation statistics
too: its per-stage means, scales and threshold are re-estimated on the same images
(the learned covariance shape is kept), or the guard, still centred on the training
site, would turn the re-normalised site's radiographs away. Temperature and the
threshold rule are kept. The adapted file
records what was adapted, on how many images and the source model's sha256.
Labels are never read: the input is a list of images.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.calibration import apply_temperature
from model.inference import Predictor, read_weights_file, sha256_file
from model.network import PneumoNet, tta_forward
from model.preprocess import to_model_batch

__all__ = ["AdaptationResult", "adapt_weights", "estimate_prior", "renormalise"]

_MIN_IMAGES = 16  # fewer images give BN statistics noisier than the training site's


@dataclass(frozen=True)
class AdaptationResult:
    """What :func:`adapt_weights` wrote and estimated."""

    path: Path
    n_images: int
    prior_source: float  # pneumonia share the calibration was fitted at
    prior_site: float | None  # EM estimate at the site (None: prior not adapted)


def estimate_prior(
    probabilities: np.ndarray, prior_source: float, max_iter: int = 100, tol: float = 1e-6
) -> float:
    """EM estimate of the positive-class share behind ``probabilities`` (Saerens et al. 2002).

    ``probabilities`` are calibrated at ``prior_source``; each step re-weights them to
    the current prior estimate and takes their mean as the next estimate.

    Raises:
        ValueError: ``prior_source`` is not in (0, 1) or ``probabilities`` is empty.
    """
    if not 0.0 < prior_source < 1.0:
        raise ValueError(f"prior_source: must be in (0, 1), got {prior_source}")
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-6, 1 - 1e-6)
    if p.size == 0:
        raise ValueError("probabilities: empty")
    prior = prior_source
    for _ in range(max_iter):
        w1 = prior / prior_source * p
        w0 = (1 - prior) / (1 - prior_source) * (1 - p)
        new = float(np.mean(w1 / (w1 + w0)))
        if abs(new - prior) < tol:
            prior = new
            break
        prior = new
    return min(max(prior, 1e-4), 1 - 1e-4)


@torch.no_grad()
def renormalise(net: PneumoNet, batches: Sequence[torch.Tensor]) -> PneumoNet:
    """A copy of ``net`` whose BatchNorm running statistics are those of ``batches``.

    Cumulative averages over all batches (``momentum=None``), computed in train mode
    without gradients; every learned parameter is left exactly as it was.
    """
    adapted = copy.deepcopy(net)
    bns = [m for m in adapted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    adapted.train()
    for x in batches:
        adapted(x)
    for bn in bns:
        bn.momentum = 0.1
    return adapted.eval()


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def adapt_weights(
    weights: Path,
    images: Sequence[np.ndarray],
    out: Path,
    version: str,
    *,
    adapt_prior: bool = False,
    batch_size: int = 32,
) -> AdaptationResult:
    """Write ``out``: ``weights`` re-normalised on ``images`` (2-D float [0, 1], no labels).

    Raises:
        ValueError: fewer than 16 images, or ``out`` would overwrite ``weights``.
    """
    weights, out = Path(weights), Path(out)
    if len(images) < _MIN_IMAGES:
        raise ValueError(f"images: need at least {_MIN_IMAGES} to estimate statistics")
    if out.resolve() == weights.resolve():
        raise ValueError("out: must not overwrite the source weights file")
    payload: dict[str, Any] = read_weights_file(weights)
    source = Predictor(weights, device="cpu", batch_size=batch_size)
    size = source.info.input_size
    batches = [
        to_model_batch(images[i : i + batch_size], size, equalize=source.info.equalize)
        for i in range(0, len(images), batch_size)
    ]
    net = renormalise(source.net, batches)
    new = dict(payload)
    new["version"] = version
    new["state_dict"] = {k: v.detach().cpu() for k, v in net.state_dict().items()}

    training = payload.get("training", {})
    prior_source = training.get("n_val_pneumonia", 0) / max(training.get("n_val", 0), 1)
    prior_site: float | None = None
    mirror = payload.get("tta", "hflip-mean-logit") != "none"
    with torch.inference_mode():
        outputs = [tta_forward(net, b, mirror=mirror) for b in batches]
    logits = torch.cat([o[0] for o in outputs]).float().numpy()
    features = torch.cat([o[1] for o in outputs]).float().numpy()
    # the guard's statistics are normalisation statistics too: re-centred on the site
    new["ood"] = source.ood.recentred(features).to_dict()
    if adapt_prior and 0.0 < prior_source < 1.0:
        probs = apply_temperature(logits, source.info.temperature, source.info.bias)
        prior_site = estimate_prior(probs, prior_source)
        shift = _logit(prior_site) - _logit(prior_source)
        new["bias"] = float(payload.get("bias", 0.0)) + shift
        thr = min(max(float(payload["threshold"]), 1e-9), 1 - 1e-9)
        new["threshold"] = 1.0 / (1.0 + math.exp(-(_logit(thr) + shift)))
    new["adaptation"] = {
        "method": "AdaBN: BatchNorm running statistics re-estimated on unlabelled site images"
        + "; not-a-chest guard re-centred on them (means, scales, threshold)"
        + ("; class prior by EM (Saerens et al. 2002)" if prior_site is not None else ""),
        "source_version": payload.get("version"),
        "source_sha256": sha256_file(weights),
        "n_images": len(images),
        "prior_source": prior_source,
        "prior_site": prior_site,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(new, tmp)
    tmp.replace(out)
    return AdaptationResult(out, len(images), prior_source, prior_site)
