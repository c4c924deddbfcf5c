"""Stage 3, predict: the model over every usable image, several studies' images per call.

The usable images of all given studies are pooled and go through the model
in chunks of the configured batch size (one call when they fit). Results are
handed back per study, in image order; an image has a heatmap exactly when the
guard judged it a chest radiograph.

Two ways through the model, timed under the same two keys:

* a :class:`~worker.predictor.SinglePassPredictor` (production): one
  :meth:`~worker.predictor.SinglePassPredictor.predict_with_heatmaps` call per
  chunk, one forward pass giving probability and Grad-CAM. ``inference`` is
  that whole call (forward, Grad-CAM backward, map upsampling);
  ``heatmaps`` only keeping the chest images' maps (the others are dropped),
  so it is close to zero.
* any other :class:`~worker.predictor.Predictor`:
  :meth:`~worker.predictor.Predictor.predict` over every image (``inference``),
  then :meth:`~worker.predictor.Predictor.heatmaps` over the chest radiographs
  among them (``heatmaps``), a second pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from dicom_io.sc import capture_shape
from worker.predictor import Image, Prediction, Predictor, SinglePassPredictor, single_pass
from worker.stages.load import LoadedStudy
from worker.stages.read import ReadInstance, ReadStudy
from worker.stages.timing import StageTimer, timed

__all__ = ["PredictedImage", "PredictedStudy", "predict"]

_T = TypeVar("_T")


@dataclass(frozen=True)
class PredictedImage:
    """One read image with the model's verdict; a heatmap exactly when it is a chest X-ray."""

    instance: ReadInstance
    source: Dataset
    """The instance's parsed header and pixels (what the SR and SC refer to)."""
    image: Image
    prediction: Prediction
    heatmap: npt.NDArray[np.float32] | None


@dataclass(frozen=True)
class PredictedStudy:
    """A read study with one :class:`PredictedImage` per usable image, in order."""

    read: ReadStudy
    images: tuple[PredictedImage, ...]

    @property
    def study(self) -> LoadedStudy:
        return self.read.study

    @property
    def predictions(self) -> tuple[Prediction, ...]:
        return tuple(i.prediction for i in self.images)

    @property
    def chest(self) -> tuple[PredictedImage, ...]:
        """The images that passed the not-a-chest guard: the ones the finding rests on."""
        return tuple(i for i in self.images if i.prediction.is_chest)


_Usable = tuple[int, ReadInstance, Dataset, Image]


def _usable(studies: Sequence[ReadStudy]) -> list[_Usable]:
    """(study index, instance, dataset, image) for every decoded image, studies in order."""
    return [
        (k, item, item.loaded.dataset, item.image)
        for k, study in enumerate(studies)
        for item in study.instances
        if item.image is not None and item.loaded.dataset is not None
    ]


def _in_batches(
    call: Callable[[Sequence[Image]], Sequence[_T]],
    images: Sequence[Image],
    batch_size: int | None,
    what: str,
) -> list[_T]:
    """``call`` over ``images`` in chunks of ``batch_size`` (None: one call); never on nothing."""
    size = batch_size or len(images)
    out: list[_T] = []
    for start in range(0, len(images), max(1, size)):
        chunk = images[start : start + size]
        got = list(call(chunk))
        _check_count(got, chunk, what)
        out += got
    return out


def _check_count(got: Sequence[object], chunk: Sequence[Image], what: str) -> None:
    if len(got) != len(chunk):
        raise ValueError(f"predictor returned {len(got)} {what} for {len(chunk)} image(s)")


def _joint(
    predictor: SinglePassPredictor, images: Sequence[Image], heatmap_max_side: int
) -> list[tuple[Prediction, npt.NDArray[np.float32]]]:
    """One single-pass call: (prediction, heatmap) per image of ``images``.

    With ``heatmap_max_side`` the maps come at the heatmap capture's size
    (:func:`dicom_io.sc.capture_shape`), so no full-resolution map is made.
    """
    if heatmap_max_side > 0:
        shapes = [capture_shape(np.shape(image), heatmap_max_side) for image in images]
        predictions, maps = predictor.predict_with_heatmaps(images, shapes)
    else:
        predictions, maps = predictor.predict_with_heatmaps(images)
    _check_count(predictions, images, "predictions")
    _check_count(maps, images, "heatmaps")
    return list(zip(predictions, maps, strict=True))


def _run_model(
    predictor: Predictor,
    images: Sequence[Image],
    batch_size: int | None,
    timer: StageTimer | None,
    heatmap_max_side: int,
) -> tuple[list[Prediction], dict[int, npt.NDArray[np.float32]]]:
    """(prediction of every image, heatmap of each chest one by index): one pass if it can."""
    single = single_pass(predictor)
    if single is not None:
        with timed(timer, "inference"):
            pairs = _in_batches(
                lambda chunk: _joint(single, chunk, heatmap_max_side), images, batch_size, "results"
            )
        with timed(timer, "heatmaps"):
            predictions = [p for p, _ in pairs]
            kept = {j: m for j, (p, m) in enumerate(pairs) if p.is_chest}
        return predictions, kept
    with timed(timer, "inference"):
        predictions = _in_batches(predictor.predict, images, batch_size, "predictions")
    chest = [j for j, p in enumerate(predictions) if p.is_chest]
    with timed(timer, "heatmaps"):
        maps = _in_batches(predictor.heatmaps, [images[j] for j in chest], batch_size, "heatmaps")
    return predictions, dict(zip(chest, maps, strict=True))


def predict(
    predictor: Predictor,
    studies: Sequence[ReadStudy],
    *,
    batch_size: int | None = None,
    timer: StageTimer | None = None,
    heatmap_max_side: int = 0,
) -> tuple[PredictedStudy, ...]:
    """Run ``predictor`` over the usable images of ``studies`` together; one result per study.

    Images of different studies share calls: with ``batch_size`` None, one
    call takes them all; otherwise each call takes at most ``batch_size``
    (``PNEUMO_BATCH_SIZE``). A :class:`~worker.predictor.SinglePassPredictor`
    is called once per chunk; any other predictor through ``predict`` and then
    ``heatmaps`` (see the module docstring). Timed as ``inference`` and
    ``heatmaps``. The predictor is not called at all when there is nothing to
    predict (nor ``heatmaps`` when there is no chest image to explain).
    ``heatmap_max_side`` > 0 asks a single-pass predictor for each map at the
    heatmap capture's size (``PNEUMO_HEATMAP_MAX_SIDE``); other predictors'
    maps keep their image's size and are scaled when the capture is built.

    Raises:
        ValueError: ``batch_size`` is below 1, ``heatmap_max_side`` is negative, or the
            predictor returned a different number of predictions or heatmaps than
            images it was given.
        Exception: whatever the predictor raises (the task retries the study).
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if heatmap_max_side < 0:
        raise ValueError("heatmap_max_side must not be negative")
    usable = _usable(studies)
    images = [image for *_, image in usable]
    predictions, heatmap_of = _run_model(predictor, images, batch_size, timer, heatmap_max_side)
    per_study: list[list[PredictedImage]] = [[] for _ in studies]
    for j, ((k, item, ds, image), p) in enumerate(zip(usable, predictions, strict=True)):
        per_study[k].append(PredictedImage(item, ds, image, p, heatmap_of.get(j)))
    return tuple(
        PredictedStudy(study, tuple(found)) for study, found in zip(studies, per_study, strict=True)
    )
