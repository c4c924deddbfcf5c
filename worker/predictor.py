"""What the pipeline needs from a model: the :class:`Predictor` protocol.

:class:`model.inference.Predictor` satisfies it; so does any test double with
the same three members. A predictor that can give predictions and heatmaps
from one forward pass also satisfies :class:`SinglePassPredictor` (the
production one does); :func:`single_pass` tells the pipeline whether it can
use that. The pipeline never imports torch through this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt

__all__ = [
    "Image",
    "ModelDescription",
    "Prediction",
    "Predictor",
    "SinglePassPredictor",
    "single_pass",
]

Image = npt.NDArray[Any]
"""A 2-D float image in [0, 1], brighter = denser (:func:`dicom_io.pixels.read_pixels`)."""


class ModelDescription(Protocol):
    """What a result records about the model that produced it (the model card's identity)."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def sha256(self) -> str:
        """Of the weights file."""
        ...

    @property
    def threshold(self) -> float:
        """Operating point on the calibrated probability."""
        ...

    @property
    def intended_population(self) -> str: ...
    @property
    def max_age_years(self) -> int | None:
        """Upper age of the intended population; None when the card gives none."""
        ...

    @property
    def precision(self) -> str:
        """What the forward pass computed in: ``float32``, ``float16`` or ``bfloat16``."""
        ...


class Prediction(Protocol):
    """The model's verdict on one image."""

    @property
    def probability(self) -> float:
        """Calibrated P(pneumonia)."""
        ...

    @property
    def ood_score(self) -> float: ...
    @property
    def is_chest(self) -> bool:
        """The image passed the not-a-chest-radiograph guard."""
        ...

    @property
    def finding(self) -> bool:
        """Pneumonia suspected: a chest radiograph at or above the threshold."""
        ...


class Predictor(Protocol):
    """A loaded model: one batched forward pass per call, one result per image, in order."""

    @property
    def info(self) -> ModelDescription: ...

    def predict(self, images: Sequence[Image]) -> Sequence[Prediction]:
        """One :class:`Prediction` per image, in the order given."""
        ...

    def heatmaps(self, images: Sequence[Image]) -> Sequence[npt.NDArray[np.float32]]:
        """One float32 [0, 1] map per image, at the image's own (H, W)."""
        ...


class SinglePassPredictor(Predictor, Protocol):
    """A :class:`Predictor` that also explains in the pass that predicts."""

    def predict_with_heatmaps(
        self,
        images: Sequence[Image],
        heatmap_shapes: Sequence[tuple[int, int]] | None = None,
    ) -> tuple[Sequence[Prediction], Sequence[npt.NDArray[np.float32]]]:
        """(:meth:`predict`, :meth:`heatmaps`) of ``images`` from one forward pass.

        A map for every image, chest or not; the Grad-CAM comes from the
        activations and gradients of the pass that produced the probability.
        Each map has the (H, W) of ``heatmap_shapes`` when given (one per
        image), else its image's own.

        Raises:
            ValueError: ``heatmap_shapes`` does not have one shape per image.
        """
        ...


def single_pass(predictor: Predictor) -> SinglePassPredictor | None:
    """``predictor`` as a :class:`SinglePassPredictor` when it has the method, else None."""
    if callable(getattr(predictor, "predict_with_heatmaps", None)):
        return cast(SinglePassPredictor, predictor)
    return None
