"""Post-hoc calibration and the operating threshold, both fitted on validation only.

* Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks",
  ICML 2017): one scalar ``T`` so that ``sigmoid(logit / T)`` minimises the
  negative log-likelihood on the validation set. It does not change the ranking
  (AUC), only how confident the probabilities are.
* Platt-style bias (Platt 1999): the network is trained with a class-balanced loss,
  which shifts its logits as if both classes were equally frequent; a bias term
  ``b`` fitted jointly with ``T`` (``sigmoid(logit / T + b)``) undoes that shift.
  Chosen on validation: in 2-fold cross-validation on the validation split it
  gave ECE 0.024 against 0.074 for temperature alone.
* The operating threshold on the *calibrated* probability is the highest one that
  still reaches a target sensitivity (default 0.95) on validation.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["apply_temperature", "fit_platt", "fit_temperature", "threshold_for_sensitivity"]


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 200) -> float:
    """Temperature T > 0 minimising the binary NLL of ``sigmoid(logits / T)``."""
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    if z.numel() == 0 or y.min() == y.max():
        return 1.0  # nothing to fit on a single-class or empty set
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z / log_t.exp(), y)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    t = float(log_t.detach().exp())
    return t if math.isfinite(t) and 0.01 < t < 100 else 1.0


def fit_platt(logits: np.ndarray, labels: np.ndarray, max_iter: int = 200) -> tuple[float, float]:
    """(T > 0, b) minimising the binary NLL of ``sigmoid(logits / T + b)``."""
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    if z.numel() == 0 or y.min() == y.max():
        return 1.0, 0.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t, bias], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z / log_t.exp() + bias, y)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    t, b = float(log_t.detach().exp()), float(bias.detach())
    if not (math.isfinite(t) and math.isfinite(b) and 0.01 < t < 100):
        return 1.0, 0.0
    return t, b


def apply_temperature(logits: np.ndarray, temperature: float, bias: float = 0.0) -> np.ndarray:
    """Calibrated probabilities ``sigmoid(logits / T + b)``."""
    z = np.asarray(logits, dtype=np.float64) / temperature + bias
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float64)


def threshold_for_sensitivity(
    probabilities: np.ndarray, labels: np.ndarray, target: float = 0.95
) -> float:
    """Highest threshold t with sensitivity(p >= t) >= target on these labels."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    pos = np.sort(p[y])[::-1]
    if pos.size == 0:
        raise ValueError("no positive samples to set a sensitivity threshold on")
    k = int(math.ceil(target * pos.size))  # need at least k positives at or above t
    return float(pos[max(k, 1) - 1])
