"""The AI heatmap as a Secondary Capture image, for viewers that cannot render SR.

:func:`build_heatmap_sc` blends a caller-supplied heatmap (float in [0, 1],
same shape as the image) over the image as read by
:func:`dicom_io.pixels.read_pixels`, burns in the text
"AI heatmap — not for diagnosis", and wraps the RGB result in a Secondary
Capture Image (PS3.3 §A.8.1) built with :class:`highdicom.sc.SCImage`:

* same patient and study as the source (copied by highdicom from it), a new
  series of its own, SOP Instance UID :func:`heatmap_sc_uid` (deterministic,
  so a re-send replaces instead of duplicating);
* Image Type DERIVED\\SECONDARY, Burned In Annotation YES (PS3.3
  §C.7.6.1.1.3: the pixels carry text), Source Image Sequence and
  Derivation Description pointing at the image that was read;
* RGB, 8 bits, Explicit VR Little Endian, no compression (every viewer reads it).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io.sanitize import sanitized_copy
from dicom_io.sr import AlgorithmInfo, lo, no_phi_warnings
from dicom_io.uids import derive_uid, require_uid

__all__ = [
    "BURNED_IN_TEXT",
    "blend_heatmap",
    "build_heatmap_sc",
    "burn_in_text",
    "capture_shape",
    "heatmap_sc_uid",
    "heatmap_series_uid",
]


BURNED_IN_TEXT = "AI heatmap — not for diagnosis"
SC_SERIES_NUMBER = 9902
SERIES_DESCRIPTION = "AI heatmap (not for diagnosis)"
# Heat at 1.0 covers the image at this opacity; heat 0 leaves it untouched.
MAX_ALPHA = 0.5
_BIPED = frozenset("APRLHF")


def capture_shape(shape: tuple[int, ...], max_side: int) -> tuple[int, int]:
    """(rows, columns) of the heatmap capture of an image of ``shape`` (rows, columns, ...).

    The image scaled down, aspect kept, so its longest side is ``max_side``
    (0: no limit); never scaled up. The capture is a display aid, not a
    diagnostic image: a 2048² RGB capture is 12 MB to build, store and send,
    a 1024² one a quarter of that.

    Raises:
        ValueError: ``max_side`` is negative or ``shape`` has an empty side.
    """
    if max_side < 0:
        raise ValueError("max_side must not be negative")
    rows, columns = int(shape[0]), int(shape[1])
    if rows < 1 or columns < 1:
        raise ValueError(f"image shape {tuple(shape)} has an empty side")
    if max_side == 0 or max(rows, columns) <= max_side:
        return rows, columns
    scale = max_side / max(rows, columns)
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def heatmap_sc_uid(study_uid: str, source_sop_uid: str, model_version: str, revision: int) -> str:
    """SOP Instance UID of the heatmap SC for one source image of a study.

    Raises:
        InvalidUIDError: ``study_uid`` or ``source_sop_uid`` is not a valid UID.
    """
    require_uid(study_uid, "Study Instance UID")
    require_uid(source_sop_uid, "source SOP Instance UID")
    return derive_uid("pneumo-sc", study_uid, source_sop_uid, model_version, int(revision))


def heatmap_series_uid(study_uid: str, model_version: str) -> str:
    require_uid(study_uid, "Study Instance UID")
    return derive_uid("pneumo-sc-series", study_uid, model_version)


_HEAT_OFFSETS = (0.0, 1.0, 2.0)
"""The black-red-yellow-white ("hot") colour map: channel c is clip(3 * heat - offset_c, 0, 1)."""


def blend_heatmap(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """Blend ``heatmap`` over grey ``image`` (both float [0, 1], same 2-D shape) into uint8 RGB.

    The opacity follows the heat, so cold regions show the radiograph unchanged:
    ``(1 - a) * grey + a * hot(heat)`` with ``a = MAX_ALPHA * heat``, computed a
    channel at a time in float32 into the output (a 1024² capture is built
    without any full-size float RGB temporary).
    """
    image = _checked(image, "image")
    heat = _checked(heatmap, "heatmap")
    if image.shape != heat.shape:
        raise ValueError(f"heatmap shape {heat.shape} differs from image shape {image.shape}")
    alpha = np.float32(MAX_ALPHA) * heat
    keep = np.float32(1.0) - alpha
    grey = keep * image
    out = np.empty((*image.shape, 3), dtype=np.uint8)
    colour = np.empty_like(heat)
    for channel, offset in enumerate(_HEAT_OFFSETS):
        np.multiply(heat, np.float32(3.0), out=colour)
        colour -= np.float32(offset)
        np.clip(colour, 0.0, 1.0, out=colour)
        colour *= alpha
        colour += grey
        colour *= np.float32(255.0)
        np.rint(colour, out=colour)
        np.clip(colour, 0.0, 255.0, out=colour)
        out[..., channel] = colour
    return out


# Interpolated heatmaps (bicubic up-sampling) overshoot [0, 1] slightly; that
# is clipped. Anything further out means the caller passed the wrong scale.
_RANGE_SLACK = 0.01


def _checked(arr: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ValueError(f"{what} must be a non-empty 2-D array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinity")
    if arr.min() < -_RANGE_SLACK or arr.max() > 1.0 + _RANGE_SLACK:
        raise ValueError(f"{what} values must lie in [0, 1]")
    clipped: np.ndarray = np.clip(arr, 0.0, 1.0)
    return clipped


@lru_cache(maxsize=1)
def _font_file() -> str | None:
    """DejaVu Sans as shipped inside matplotlib (a dependency), found without importing it.

    Pillow's bundled default font has no em dash glyph; DejaVu Sans does.
    """
    spec = importlib.util.find_spec("matplotlib")
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = Path(base) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return str(path)
    return None


@lru_cache(maxsize=16)
def _font(size: int) -> tuple[ImageFont.ImageFont | ImageFont.FreeTypeFont, bool]:
    """A font of ``size`` px and whether it can draw the em dash."""
    path = _font_file()
    if path is not None:
        try:
            return ImageFont.truetype(path, size), True
        except OSError:  # pragma: no cover - unreadable font file
            pass
    try:  # pragma: no cover - only without matplotlib
        return ImageFont.load_default(size=size), False
    except (TypeError, OSError):  # pragma: no cover - old Pillow / no FreeType
        return ImageFont.load_default(), False


def burn_in_text(rgb: np.ndarray, text: str = BURNED_IN_TEXT) -> np.ndarray:
    """Draw ``text`` white on a black band across the top of ``rgb`` (uint8 H x W x 3)."""
    height, width = rgb.shape[:2]
    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    size = max(8, min(width // 24, height // 12))
    font, has_dash = _font(size)
    if not has_dash:
        text = text.replace("\u2014", "-")
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    # Shrink until the text fits the width (tiny images).
    while right - left > width - 4 and size > 6:
        size -= 1
        font, _ = _font(size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, size // 4)
    band = bottom - top + 2 * pad
    draw.rectangle([0, 0, width, min(band, height)], fill=(0, 0, 0))
    draw.text((pad - left, pad - top), text, fill=(255, 255, 255), font=font)
    return np.array(img, dtype=np.uint8)


def _orientation(source: Dataset) -> tuple[str, str] | None:
    """Patient Orientation of the source when it is two simple biped directions."""
    value = source.get("PatientOrientation")
    if value is None or len(value) != 2:
        return None
    row, col = (str(v).strip().upper() for v in value)
    if row in _BIPED and col in _BIPED:
        return row, col
    return None


def build_heatmap_sc(
    *,
    source: Dataset,
    image: np.ndarray,
    heatmap: np.ndarray,
    algorithm: AlgorithmInfo,
    revision: int,
) -> Dataset:
    """Build the heatmap Secondary Capture for ``source``.

    ``image`` is the array :func:`dicom_io.pixels.read_pixels` returned for
    ``source``; ``heatmap`` is float [0, 1] of the same shape. The header
    values copied from ``source`` are sanitised first
    (:func:`dicom_io.sanitize.sanitized_copy`).

    Raises:
        ValueError: shape or value problems of ``image``/``heatmap``, a
            negative ``revision``, or invalid source UIDs.
    """
    if revision < 0:
        raise ValueError("revision must be >= 0")
    # Patient and study attributes are copied from the source: invalid dates
    # or NULs there must not fail the build (the caller's data set is unchanged).
    source, _fixes = sanitized_copy(source)
    study_uid = require_uid(source.get("StudyInstanceUID"), "Study Instance UID")
    source_uid = require_uid(source.get("SOPInstanceUID"), "source SOP Instance UID")
    rgb = burn_in_text(blend_heatmap(image, heatmap))

    orientation = _orientation(source)
    with no_phi_warnings():  # highdicom quotes patient names in warnings
        sc = _sc_image(source, rgb, study_uid, source_uid, algorithm, revision, orientation)
    _add_attributes(sc, source, source_uid, algorithm, orientation)
    return sc


def _sc_image(
    source: Dataset,
    rgb: np.ndarray,
    study_uid: str,
    source_uid: str,
    algorithm: AlgorithmInfo,
    revision: int,
    orientation: tuple[str, str] | None,
) -> SCImage:
    return SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=heatmap_series_uid(study_uid, algorithm.version),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=heatmap_sc_uid(study_uid, source_uid, algorithm.version, revision),
        instance_number=revision + 1,
        manufacturer=lo(algorithm.manufacturer),
        # highdicom insists on an orientation for PATIENT; replaced below when unknown.
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=lo(algorithm.model_name),
        software_versions=lo(algorithm.version),
    )


def _add_attributes(
    sc: SCImage,
    source: Dataset,
    source_uid: str,
    algorithm: AlgorithmInfo,
    orientation: tuple[str, str] | None,
) -> None:
    if orientation is None:
        # Patient Orientation is Type 2C in the General Image module (PS3.3
        # §C.7.6.1): present but empty when we do not know it, never invented.
        sc.PatientOrientation = None  # type: ignore[assignment]  # empty Type 2C
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"  # PS3.3 §C.8.6.1: workstation
    sc.SecondaryCaptureDeviceManufacturer = lo(algorithm.manufacturer)
    sc.SecondaryCaptureDeviceManufacturerModelName = lo(algorithm.model_name)
    sc.SecondaryCaptureDeviceSoftwareVersions = lo(algorithm.version)
    sc.DerivationDescription = (
        f"Heatmap of {algorithm.name} {algorithm.version} blended over the source image; "
        "not for diagnosis"
    )[:1024]
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source_uid
    sc.SourceImageSequence = [ref]
    if source.get("BodyPartExamined"):
        sc.BodyPartExamined = source.BodyPartExamined
    elif "Laterality" not in sc:
        # Laterality is Type 2C in General Series (PS3.3 §C.7.3.1): required
        # when the body part might be paired. Without Body Part Examined that
        # cannot be ruled out, so it is sent empty (= unknown); with CHEST
        # (unpaired) it must be absent.
        sc.Laterality = None  # type: ignore[assignment]  # empty Type 2C
