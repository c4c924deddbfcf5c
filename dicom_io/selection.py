"""Decide, from the header alone, whether an instance is a frontal chest radiograph.

The model was trained on frontal (PA/AP) chest radiographs. Everything else a
PACS forwards in the same study (laterals, CT, SR, dose reports, colour
photographs, multi-frame objects) is stored but *skipped*, with a
machine-readable reason from :class:`SkipReason`.

Rules, applied in this order (the first failing rule gives the reason):

1. Modality (0008,0060) CR or DX, else ``modality:<value>`` (``modality:SR``,
   ``modality:none`` when absent). Secondary Capture objects (PS3.3 §A.8) are
   accepted with Modality OT (or absent) only when Body Part Examined is CHEST;
   a Secondary Capture that says DX/CR is treated as DX/CR (the NIH ChestX-ray14
   DICOMs are such objects).
2. Pixel Data must be present (PS3.3 §C.7.6.3). A dataset that carries image
   attributes (Rows) but no Pixel Data is accepted here, because callers may
   read headers with ``stop_before_pixels``; :func:`dicom_io.pixels.read_pixels`
   rejects it later with ``no-pixel-data``.
3. Body Part Examined (0018,0015) must be CHEST when present (PS3.16 Annex L
   / CID 4031 code value for the chest). Absent = not contradicted = accepted.
4. View: View Position (0018,5101, PS3.3 §C.8.11.5) must be PA or AP. LL/RL
   (and free-text LAT/LATERAL) give ``lateral-view``; anything else
   (oblique RLO/LLO, decubitus RLD/LLD, garbage) gives ``view:<value>``.
   When View Position is absent or empty, Patient Position (0018,5100) is
   consulted because some exporters (e.g. the NIH/Udacity DICOMs) put the
   view there: PA/AP accepted, lateral rejected, a real patient-position
   term (HFS, FFP, ...) carries no view information and is ignored, and any
   other value (e.g. ``XX``) gives ``view:<value>``. When neither says
   anything the view is unknown and the image is accepted: many frontal CXRs
   in the wild carry no view at all, and refusing them would make the
   product useless on them. The worker may flag such results.
5. Single frame (Number of Frames absent or 1).
6. Monochrome: Photometric Interpretation MONOCHROME1/2 with one sample per
   pixel (PS3.3 §C.7.6.3.1.2).
7. For presentation: DX "For Processing" objects (Presentation Intent Type
   FOR PROCESSING, PS3.3 §C.8.11.1, or the For Processing SOP Class) are raw
   detector data that no viewer or model should read as is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from os import PathLike

from pydicom.dataset import Dataset

from dicom_io.part10 import read_header
from dicom_io.pixels import PixelErrorKind

__all__ = ["Selection", "SkipReason", "select_instance", "select_file"]


class SkipReason(str, Enum):
    """The one place skip-reason codes live.

    Plain members are complete codes; parameterised codes (``modality:CT``)
    are built by the static helpers so their spelling stays in one place.
    """

    NO_PIXEL_DATA = "no-pixel-data"
    """Neither Pixel Data nor image attributes (Rows)."""
    LATERAL_VIEW = "lateral-view"
    """View Position (or Patient Position) says lateral."""
    MULTI_FRAME = "multi-frame"
    """Number of Frames is not 1 (or unparseable)."""
    FOR_PROCESSING = "for-processing"
    """DX For Processing: raw detector data (PS3.3 §C.8.11.1)."""
    UNREADABLE = "unreadable"
    """The file or its header cannot be read at all."""

    def __str__(self) -> str:  # so f"{SkipReason.X}" gives the code
        return self.value

    @staticmethod
    def modality(value: object) -> str:
        return f"modality:{_code(value)}"

    @staticmethod
    def body_part(value: object) -> str:
        return f"body-part:{_code(value)}"

    @staticmethod
    def view(value: object) -> str:
        return f"view:{_code(value)}"

    @staticmethod
    def not_monochrome(value: object) -> str:
        return f"not-monochrome:{_code(value)}"

    @staticmethod
    def undecodable(kind: PixelErrorKind) -> str:
        """``undecodable:<kind>`` for a :class:`dicom_io.pixels.PixelReadError` ``kind``.

        Raises:
            ValueError: ``kind`` is not a :class:`PixelErrorKind` (nor one's code).
        """
        return f"undecodable:{PixelErrorKind(kind).value}"


@dataclass(frozen=True)
class Selection:
    """Outcome of :func:`select_instance`: ``reason`` is None exactly when selected."""

    selected: bool
    reason: str | None

    @classmethod
    def accept(cls) -> Selection:
        return cls(True, None)

    @classmethod
    def skip(cls, reason: str | SkipReason) -> Selection:
        return cls(False, str(reason))


# Secondary Capture family, PS3.4 Annex B.5 (single- and multi-frame SC).
SECONDARY_CAPTURE_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.7.1",
        "1.2.840.10008.5.1.4.1.1.7.2",
        "1.2.840.10008.5.1.4.1.1.7.3",
        "1.2.840.10008.5.1.4.1.1.7.4",
    }
)
# Digital X-Ray Image Storage - For Processing (PS3.4 Annex B.5).
DX_FOR_PROCESSING_CLASS = "1.2.840.10008.5.1.4.1.1.1.1.1"
RADIOGRAPHY_MODALITIES = frozenset({"CR", "DX"})
SECONDARY_CAPTURE_MODALITIES = frozenset({"OT", "NONE"})
CHEST = "CHEST"
FRONTAL_VIEWS = frozenset({"PA", "AP"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT"})
# PS3.3 §C.7.3.1.1.2 defined terms for Patient Position: say nothing about the view.
PATIENT_POSITIONS = frozenset(
    {
        "HFP",
        "HFS",
        "HFDR",
        "HFDL",
        "FFDR",
        "FFDL",
        "FFP",
        "FFS",
        "LFP",
        "LFS",
        "RFP",
        "RFS",
        "AFDR",
        "AFDL",
        "PFDR",
        "PFDL",
    }
)

_NOT_CODE = re.compile(r"[^A-Z0-9_ ]")


def _code(value: object) -> str:
    """Normalise a header value for use inside a reason code.

    Code strings (CS, PS3.5 §6.2) are at most 16 characters of A-Z, 0-9,
    space and underscore; tampered headers may hold anything, so everything
    else is replaced and the result cut to 16 characters. ``none`` stands for
    an absent or empty value.
    """
    text = str(value if value is not None else "").strip()
    if not text:
        return "none"
    return _NOT_CODE.sub("_", text.upper())[:16]


def _str(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, None)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else ""
    return str(value).strip().upper()


def select_instance(ds: Dataset) -> Selection:
    """Decide whether ``ds`` is a frontal chest radiograph the model may read.

    Header only: pixel data is never decoded (see the module docstring for the rules).
    Never raises: a header that cannot be judged gives ``SkipReason.UNREADABLE``.
    """
    try:
        return _select(ds)
    except Exception:  # a tampered header must give a reason, never an exception
        return Selection.skip(SkipReason.UNREADABLE)


def select_file(path: str | PathLike[str]) -> Selection:
    """:func:`select_instance` for a file; an unparseable file gives ``unreadable``."""
    try:
        ds = read_header(path)
    except Exception:
        return Selection.skip(SkipReason.UNREADABLE)
    # stop_before_pixels hides Pixel Data; rule 1 then relies on Rows.
    return select_instance(ds)


def _select(ds: Dataset) -> Selection:
    modality = _str(ds, "Modality") or "NONE"
    body_part = _str(ds, "BodyPartExamined")
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if modality not in RADIOGRAPHY_MODALITIES:
        is_chest_sc = (
            sop_class in SECONDARY_CAPTURE_CLASSES
            and modality in SECONDARY_CAPTURE_MODALITIES
            and body_part == CHEST
        )
        if not is_chest_sc:
            return Selection.skip(SkipReason.modality(None if modality == "NONE" else modality))

    if "PixelData" not in ds and "Rows" not in ds:
        return Selection.skip(SkipReason.NO_PIXEL_DATA)

    if body_part and body_part != CHEST:
        return Selection.skip(SkipReason.body_part(body_part))

    view_reason = _view_reason(ds)
    if view_reason is not None:
        return Selection.skip(view_reason)

    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 0  # unparseable: not a single frame we can trust
    if frames != 1:
        return Selection.skip(SkipReason.MULTI_FRAME)

    photometric = _str(ds, "PhotometricInterpretation")
    samples = ds.get("SamplesPerPixel", 1)
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or samples not in (1, None, ""):
        return Selection.skip(SkipReason.not_monochrome(photometric or None))

    intent = _str(ds, "PresentationIntentType")
    if sop_class == DX_FOR_PROCESSING_CLASS or intent == "FOR PROCESSING":
        return Selection.skip(SkipReason.FOR_PROCESSING)
    return Selection.accept()


def _view_reason(ds: Dataset) -> str | None:
    view = _str(ds, "ViewPosition")
    if view:
        return _classify_view(view)
    position = _str(ds, "PatientPosition")
    if position and position not in PATIENT_POSITIONS:
        return _classify_view(position)
    return None  # view unknown: accepted (see module docstring)


def _classify_view(view: str) -> str | None:
    if view in FRONTAL_VIEWS:
        return None
    if view in LATERAL_VIEWS:
        return SkipReason.LATERAL_VIEW.value
    return SkipReason.view(view)
