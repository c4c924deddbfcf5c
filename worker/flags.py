"""The flags a result carries: one code each, in the database, the SR text and every listing."""

from __future__ import annotations

from enum import Enum

from model.inference import NOT_CHEST_CODE

__all__ = ["ResultFlag"]


class ResultFlag(str, Enum):
    """Why a reader should look twice at a result (``result.flags``, the SR summary)."""

    OUTSIDE_INTENDED_USE = "outside-intended-use"
    """The header shows a patient outside the population the model was validated on."""
    NOT_CHEST = NOT_CHEST_CODE
    """At least one read image looked unlike a chest radiograph (the OOD guard)."""
    NO_USABLE_IMAGE = "no-usable-image"
    """No image of the study could be assessed by the model."""

    def __str__(self) -> str:  # so f"{ResultFlag.X}" and str() give the code
        return self.value
