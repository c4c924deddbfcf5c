"""The AI result as a DICOM Structured Report, built with highdicom.

One Comprehensive 3D SR (PS3.3 §A.35.13) per (study, model version,
revision), with content following TID 1500 "Measurement Report" (PS3.16):

* Observation context (TID 1001/1004): the observer is the AI *device*
  (manufacturer, model name); the software version is the model version and
  goes into the Equipment module's Software Versions (0018,1020) and into the
  Algorithm Identification (TID 4019) of every group.
* Image library (TID 1600): every evidence image.
* One "Measurements and Qualitative Evaluations" group (TID 1501) per image
  read, with the source image reference, finding type Pneumonia
  (SCT 233604007), a qualitative evaluation Pneumonia = Present/Absent
  (SCT 52101004 / 272519000, CID 240), the probability (DCM 122157
  "Probability", UCUM "1") and the operating threshold (DCM 122411
  "Threshold Value", UCUM "1").
* A "Qualitative Evaluations" container (UMLS C0034375, TID 1500 row 12)
  holding the plain-text summary (DCM 121111 "Summary") and one TEXT item
  (DCM 121106 "Comment") per flag such as ``outside-intended-use``.

The SR is placed in the source study (patient and study attributes copied
from the evidence by highdicom), in its own series, with Completion Flag
COMPLETE and Verification Flag UNVERIFIED: a machine result that no human has
signed. Its SOP Instance UID is :func:`result_sr_uid`, so sending the same
result again replaces the earlier object at the PACS instead of adding one.

A reprocessed study gets a new revision and so a new SR, which names the SR
of the revision before it in the Predecessor Documents Sequence (0040,A360)
of the SR Document General Module (PS3.3 §C.17.2): the PACS and a reader can
tell which report replaces which (:class:`SRReference`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage

from dicom_io.sanitize import sanitize_header
from dicom_io.uids import derive_uid, require_uid

try:  # the same check highdicom's Image Library applies (private API: guarded)
    from highdicom._standard_utils import does_iod_have_pixel_data
except ImportError:  # pragma: no cover - older/newer highdicom

    def does_iod_have_pixel_data(sop_class_uid: str) -> bool:
        return True


@lru_cache(maxsize=256)
def _iod_has_pixel_data(sop_class_uid: str) -> bool:
    """Whether the IOD of ``sop_class_uid`` has pixel data, remembered per SOP Class.

    highdicom walks every attribute of every module of the IOD on each call
    (about 1 ms); a study's images share one or two SOP Classes.

    Raises:
        KeyError: no IOD is known for ``sop_class_uid`` (not remembered).
    """
    return does_iod_have_pixel_data(sop_class_uid)


__all__ = [
    "AlgorithmInfo",
    "ImageFinding",
    "PNEUMONIA",
    "PRESENT",
    "ABSENT",
    "SRReference",
    "build_result_sr",
    "no_phi_warnings",
    "result_sr_reference",
    "result_sr_uid",
    "result_series_uid",
]

# highdicom warns about single-component person names and quotes the name in
# the message: that would put patient names into logs. Exactly that warning is
# silenced, globally and again around our highdicom calls (an outer
# "always" filter would otherwise win).
_PN_WARNING = r'The string ".*" is unlikely to represent the intended person name'
warnings.filterwarnings("ignore", message=_PN_WARNING)


@contextmanager
def no_phi_warnings() -> Iterator[None]:
    """Silence highdicom's person-name warning (it quotes the name) inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PN_WARNING)
        yield


def lo(text: str) -> str:
    """A value fit for a Long String (LO, PS3.5 §6.2): at most 64 characters, no backslash."""
    return str(text).replace("\\", "/").strip()[:64]


# --- Coded concepts (PS3.16) --------------------------------------------------
PNEUMONIA = CodedConcept("233604007", "SCT", "Pneumonia")
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("272519000", "SCT", "Absent")
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
THRESHOLD = CodedConcept("122411", "DCM", "Threshold Value")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
SUMMARY = CodedConcept("121111", "DCM", "Summary")
COMMENT = CodedConcept("121106", "DCM", "Comment")
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
# Procedure reported (CID 100 is extensible): "Plain chest X-ray".
PLAIN_CHEST_XRAY = CodedConcept("399208008", "SCT", "Plain chest X-ray")

SR_SERIES_NUMBER = 9901
SERIES_DESCRIPTION = "AI pneumonia result (unverified)"


@dataclass(frozen=True)
class AlgorithmInfo:
    """Identity of the AI device and model that produced a result."""

    name: str
    version: str
    manufacturer: str
    model_name: str
    parameters: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for attr in ("name", "version", "manufacturer", "model_name"):
            if not str(getattr(self, attr)).strip():
                raise ValueError(f"AlgorithmInfo.{attr} must not be empty")

    @property
    def device_uid(self) -> str:
        """Device Observer UID (TID 1004): stable for a manufacturer + model name."""
        return derive_uid("pneumo-device", self.manufacturer, self.model_name)

    def parameter_strings(self) -> list[str]:
        return [f"{k}={v}" for k, v in sorted(self.parameters.items())]


@dataclass(frozen=True)
class ImageFinding:
    """The model's output for one image: pneumonia probability and the threshold used."""

    source: Dataset
    probability: float
    threshold: float

    def __post_init__(self) -> None:
        for attr in ("probability", "threshold"):
            value = float(getattr(self, attr))
            if not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"ImageFinding.{attr} must be a finite number in [0, 1]")
        require_uid(self.source.get("SOPInstanceUID"), "source SOP Instance UID")

    @property
    def present(self) -> bool:
        """Pneumonia is reported present when the probability reaches the threshold."""
        return self.probability >= self.threshold


def result_sr_uid(study_uid: str, model_version: str, revision: int) -> str:
    """SOP Instance UID of the result SR for (study, model version, revision).

    Raises:
        InvalidUIDError: ``study_uid`` is not a valid UID (PS3.5 §9.1).
    """
    require_uid(study_uid, "Study Instance UID")
    return derive_uid("pneumo-sr", study_uid, model_version, int(revision))


def result_series_uid(study_uid: str, model_version: str) -> str:
    """Series Instance UID shared by every revision of the result SR of a study."""
    require_uid(study_uid, "Study Instance UID")
    return derive_uid("pneumo-sr-series", study_uid, model_version)


@dataclass(frozen=True)
class SRReference:
    """An SR document another one names in its Predecessor Documents Sequence (0040,A360).

    The four UIDs of a Hierarchical SOP Instance Reference (PS3.3 §C.17.2.3,
    Table C.17-3): study, series, SOP class and SOP instance.

    Raises:
        InvalidUIDError: from ``__post_init__``, a UID is not valid (PS3.5 §9.1);
            the message names which.
    """

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str

    def __post_init__(self) -> None:
        for attr in ("study_uid", "series_uid", "sop_class_uid", "sop_instance_uid"):
            require_uid(getattr(self, attr), f"SRReference.{attr}")

    @classmethod
    def from_dataset(cls, ds: Dataset) -> SRReference:
        """The reference to an SR data set (a file read back, headers are enough).

        Raises:
            InvalidUIDError: a UID is missing or invalid.
        """
        return cls(
            str(ds.get("StudyInstanceUID", "")),
            str(ds.get("SeriesInstanceUID", "")),
            str(ds.get("SOPClassUID", "")),
            str(ds.get("SOPInstanceUID", "")),
        )

    def as_dataset(self) -> Dataset:
        """The four UIDs as a data set, the form highdicom's ``previous_versions`` takes."""
        ds = Dataset()
        ds.StudyInstanceUID = self.study_uid
        ds.SeriesInstanceUID = self.series_uid
        ds.SOPClassUID = self.sop_class_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        return ds


def result_sr_reference(study_uid: str, model_version: str, sop_instance_uid: str) -> SRReference:
    """The reference to a result SR this module built, from its recorded SOP Instance UID.

    Our result SRs are Comprehensive 3D SR in the series :func:`result_series_uid`
    of (study, model version): the UIDs a database keeps are enough to name one
    whose file is gone.

    Raises:
        InvalidUIDError: a UID is not valid (PS3.5 §9.1).
    """
    return SRReference(
        study_uid=study_uid,
        series_uid=result_series_uid(study_uid, model_version),
        sop_class_uid=str(Comprehensive3DSRStorage),
        sop_instance_uid=sop_instance_uid,
    )


def _finding_group(
    finding: ImageFinding, algorithm_id: AlgorithmIdentification, sr_uid: str, index: int
) -> MeasurementsAndQualitativeEvaluations:
    src = finding.source
    sop_uid = str(src.SOPInstanceUID)
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derive_uid("pneumo-sr-group", sr_uid, sop_uid),
            identifier=f"Pneumonia assessment, image {index}",
        ),
        finding_type=PNEUMONIA,
        algorithm_id=algorithm_id,
        source_images=[SourceImageForMeasurementGroup.from_source_image(src)],
        qualitative_evaluations=[
            QualitativeEvaluation(name=PNEUMONIA, value=PRESENT if finding.present else ABSENT)
        ],
        measurements=[
            Measurement(
                name=PROBABILITY,
                value=float(finding.probability),
                unit=NO_UNITS,
                algorithm_id=algorithm_id,
            ),
            Measurement(name=THRESHOLD, value=float(finding.threshold), unit=NO_UNITS),
        ],
    )


def _text_container(summary: str, flags: Sequence[str]) -> ContainerContentItem:
    container = ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    items = [
        TextContentItem(
            name=SUMMARY, value=summary, relationship_type=RelationshipTypeValues.CONTAINS
        )
    ]
    items += [
        TextContentItem(name=COMMENT, value=flag, relationship_type=RelationshipTypeValues.CONTAINS)
        for flag in flags
    ]
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


# Patient and study attributes highdicom copies from the first evidence object.
# Most are Type 2 (PS3.3 §C.7.1.1, §C.7.2.1): present, possibly empty. Real
# images often omit them altogether, which highdicom does not tolerate.
_STUDY_KEYWORDS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_REFERENCE_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")


def _copy_elements(ds: Dataset, keywords: Sequence[str]) -> Dataset:
    """The elements of ``ds`` named by ``keywords`` (and its character set), sanitised.

    Elements are copied as read (not converted), then :func:`sanitize_header`
    blanks invalid dates/times and strips NULs, so a malformed header value
    never fails the build, nor reaches a log line.
    """
    out = Dataset()
    for kw in ("SpecificCharacterSet", *keywords):
        if kw in ds:
            elem = ds.get_item(kw)
            if elem is not None:
                out[elem.tag] = elem
    sanitize_header(out)
    return out


def _evidence_header(ds: Dataset) -> Dataset:
    """The header subset the SR needs from an evidence object, sanitised.

    Absent Type 2 attributes are added empty.
    """
    out = _copy_elements(ds, (*_REFERENCE_KEYWORDS, *_STUDY_KEYWORDS))
    for kw in _STUDY_KEYWORDS:
        if kw not in out:
            setattr(out, kw, None)
    return out


def _library_header(ds: Dataset) -> Dataset:
    """The subset of ``ds`` highdicom needs for an Image Library entry (TID 1601/1602).

    highdicom adds the projection-radiography descriptors (TID 1603) when
    Modality is CR/DX/..., and then *requires* Patient Orientation and Imager
    Pixel Spacing, which many real radiographs lack. Modality is therefore
    only passed on when those are present, and is "OT" (no modality-specific
    descriptors) otherwise. This copy never leaves the function: the
    library's Modality descriptor is coded from the SOP Class either way.
    """
    out = _copy_elements(
        ds,
        (
            "SOPClassUID",
            "SOPInstanceUID",
            "Rows",
            "Columns",
            "StudyDate",
            "AcquisitionDate",
            "ContentDate",
        ),
    )
    orientation = ds.get("PatientOrientation")
    spacing = ds.get("ImagerPixelSpacing")
    if (
        str(ds.get("Modality", "")) in ("CR", "DX")
        and orientation is not None
        and len(orientation) == 2
        and spacing is not None
        and len(spacing) == 2
    ):
        out.Modality = ds.Modality
        out.PatientOrientation = orientation
        out.ImagerPixelSpacing = spacing
    else:
        out.Modality = "OT"
    return out


def _library_images(evidence: Sequence[Dataset]) -> list[Dataset]:
    """Evidence images that can go into the Image Library (only objects with pixel data)."""
    return [
        _library_header(ds)
        for ds in evidence
        if "Rows" in ds and "Columns" in ds and _iod_has_pixel_data(str(ds.SOPClassUID))
    ]


def _summary_text(summary: str, flags: Sequence[str]) -> str:
    text = summary.strip() or "AI pneumonia assessment."
    if flags:
        text += " Flags: " + ", ".join(flags) + "."
    # UT holds up to 2^32-2 bytes, but a PACS viewer shows a paragraph: keep it short.
    return text[:10000]


def build_result_sr(
    *,
    evidence: Sequence[Dataset],
    findings: Sequence[ImageFinding],
    algorithm: AlgorithmInfo,
    revision: int,
    summary: str,
    flags: Sequence[str] = (),
    predecessors: Sequence[SRReference] = (),
) -> Comprehensive3DSR:
    """Build the result SR for one study.

    ``evidence`` is every image of the study the SR talks about (headers are
    enough); each ``findings[i].source`` must be among them, and there must be
    at least one finding. Patient and study values are copied sanitised
    (:mod:`dicom_io.sanitize`): an invalid date or a NUL in an ID never fails
    the build, and the caller's data sets are not changed. ``predecessors``
    (the SR of the previous revision, when there is one) go into the
    Predecessor Documents Sequence (0040,A360).

    Raises:
        ValueError: evidence spans several studies, a finding's image is not
            in the evidence, there is no evidence or no finding, ``revision``
            is negative, a predecessor is the SR being built or belongs to
            another study, or an evidence UID is invalid
            (:class:`dicom_io.uids.InvalidUIDError`).
    """
    if not evidence:
        raise ValueError("evidence must contain at least one image")
    if not findings:
        # TID 1500 as implemented by highdicom needs at least one measurement
        # group; a study with no readable image gets no SR (the worker records why).
        raise ValueError("findings must contain at least one image result")
    if revision < 0:
        raise ValueError("revision must be >= 0")
    for ds in evidence:
        for kw in _REFERENCE_KEYWORDS:
            require_uid(ds.get(kw), kw)
    study_uids = {str(ds.StudyInstanceUID) for ds in evidence}
    if len(study_uids) != 1:
        raise ValueError(f"evidence spans {len(study_uids)} studies; an SR reports on one")
    study_uid = require_uid(study_uids.pop(), "Study Instance UID")
    evidence_uids = {str(ds.SOPInstanceUID) for ds in evidence}
    for finding in findings:
        if str(finding.source.SOPInstanceUID) not in evidence_uids:
            raise ValueError("every finding's source image must be in the evidence")

    # Empty TEXT values are not allowed (Text Value is Type 1, PS3.3 §C.17.3.2).
    flags = tuple(str(f).strip() for f in flags if str(f).strip())
    sr_uid = result_sr_uid(study_uid, algorithm.version, revision)
    for predecessor in predecessors:
        if predecessor.sop_instance_uid == sr_uid:
            raise ValueError("predecessors must not include the SR being built")
        if predecessor.study_uid != study_uid:
            raise ValueError("a predecessor SR must belong to the same study")
    algorithm_id = AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=algorithm.parameter_strings() or None,
        manufacturer=algorithm.manufacturer,
    )
    observation_context = ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=algorithm.device_uid,
                name=algorithm.name,
                manufacturer_name=algorithm.manufacturer,
                model_name=algorithm.model_name,
            ),
        )
    )
    groups = [
        _finding_group(finding, algorithm_id, sr_uid, i)
        for i, finding in enumerate(findings, start=1)
    ]
    with no_phi_warnings():
        return _assemble(
            study_uid,
            sr_uid,
            revision,
            algorithm,
            observation_context,
            groups,
            evidence,
            summary,
            flags,
            tuple(predecessors),
        )


def _assemble(
    study_uid: str,
    sr_uid: str,
    revision: int,
    algorithm: AlgorithmInfo,
    observation_context: ObservationContext,
    groups: list[MeasurementsAndQualitativeEvaluations],
    evidence: Sequence[Dataset],
    summary: str,
    flags: tuple[str, ...],
    predecessors: tuple[SRReference, ...],
) -> Comprehensive3DSR:
    report = MeasurementReport(
        observation_context=observation_context,
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
        referenced_images=_library_images(evidence) or None,
    )
    report[0].ContentSequence.append(_text_container(_summary_text(summary, flags), flags))

    return Comprehensive3DSR(
        evidence=[_evidence_header(ds) for ds in evidence],
        content=report[0],
        series_instance_uid=result_series_uid(study_uid, algorithm.version),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sr_uid,
        instance_number=revision + 1,
        manufacturer=lo(algorithm.manufacturer),
        manufacturer_model_name=lo(algorithm.model_name),
        software_versions=lo(algorithm.version),
        series_description=SERIES_DESCRIPTION,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=[p.as_dataset() for p in predecessors] or None,
        # Always UTF-8 (PS3.3 §C.12.1.1.2): summaries may hold any text, and
        # names copied from the evidence are re-encoded correctly whatever
        # character set the source used.
        specific_character_set="ISO_IR 192",
    )
