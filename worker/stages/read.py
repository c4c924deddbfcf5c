"""Stage 2, select and read: keep the frontal chest radiographs, decode their pixels.

Selection is header-only (:func:`dicom_io.selection.select_instance`); only the
selected instances are decoded, their pixels read from the spooled file here
(stage 1 read the headers alone). Every instance left out keeps a
:class:`~dicom_io.selection.SkipReason` code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dicom_io.pixels import PixelErrorKind, PixelReadError, read_pixels, read_pixels_file
from dicom_io.selection import SkipReason, select_instance
from worker.predictor import Image
from worker.stages.load import LoadedInstance, LoadedStudy
from worker.stages.timing import StageTimer, timed

__all__ = ["ReadInstance", "ReadStudy", "read_image", "select_and_read"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadInstance:
    """One instance after selection: ``image`` is set exactly when the model may read it."""

    loaded: LoadedInstance
    image: Image | None
    skip_reason: str | None
    """Why the instance is not read (None when ``image`` is set)."""

    @property
    def instance_id(self) -> int:
        return self.loaded.instance_id


@dataclass(frozen=True)
class ReadStudy:
    """A study after selection and decoding, every instance in load order."""

    study: LoadedStudy
    instances: tuple[ReadInstance, ...]

    @property
    def usable(self) -> tuple[ReadInstance, ...]:
        """The instances with a decoded image, in order."""
        return tuple(i for i in self.instances if i.image is not None)


def _select(item: LoadedInstance) -> str | None:
    """The skip reason of one loaded instance, or None when selected."""
    if item.dataset is None:
        return item.skip_reason or SkipReason.UNREADABLE
    return select_instance(item.dataset).reason


def _decode(item: LoadedInstance, max_pixels_bits: int) -> Image:
    """The instance's pixels: from its data set when it holds them, else from its file.

    Raises:
        PixelReadError: the pixels cannot become a model input (or the file
            can no longer be read: ``unreadable``).
    """
    assert item.dataset is not None
    if "PixelData" in item.dataset or item.path is None:
        return read_pixels(item.dataset, max_pixels_bits=max_pixels_bits)
    return read_pixels_file(item.path, max_pixels_bits=max_pixels_bits)


def read_image(item: LoadedInstance, max_pixels_bits: int) -> ReadInstance:
    """Decode a selected instance; a decode failure skips it, never fails the study."""
    if item.dataset is None:
        return ReadInstance(item, None, item.skip_reason or SkipReason.UNREADABLE)
    try:
        image = _decode(item, max_pixels_bits)
    except PixelReadError as exc:
        return ReadInstance(item, None, SkipReason.undecodable(exc.kind))
    except Exception as exc:  # a decoder bug must not fail the whole study
        log.warning("instance %s: pixel read failed: %s", item.sop_instance_uid, type(exc).__name__)
        return ReadInstance(item, None, SkipReason.undecodable(PixelErrorKind.DECODE_FAILED))
    return ReadInstance(item, image, None)


def select_and_read(
    study: LoadedStudy, *, max_pixels_bits: int, timer: StageTimer | None = None
) -> ReadStudy:
    """Select the instances of ``study`` and decode the selected ones.

    Timed as ``select`` and ``read_pixels``. Never raises for a bad instance:
    it is skipped with a reason instead.
    """
    with timed(timer, "select"):
        reasons = [_select(item) for item in study.instances]
    with timed(timer, "read_pixels"):
        instances = tuple(
            ReadInstance(item, None, reason)
            if reason is not None
            else read_image(item, max_pixels_bits)
            for item, reason in zip(study.instances, reasons, strict=True)
        )
    return ReadStudy(study, instances)
