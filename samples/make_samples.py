"""Make the demo studies in ``samples/studies/`` from real shared chest X-rays.

Run from the repository root (needs ``../shared/data``; the product itself never does)::

    .venv/bin/python samples/make_samples.py

Every study gets synthetic patient data (no real identifiers survive: only the
pixels are taken from the sources) and deterministic UIDs, so re-running the
script reproduces the same files. Sources are documented in ``samples/README.md``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from dicom_io.uids import derive_uid

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
OUT = REPO / "samples" / "studies"

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"


@dataclass(frozen=True)
class SampleImage:
    """One image of a demo study: where its pixels come from and how it is encoded."""

    source: Path
    view: str  # ViewPosition: PA, AP or LL
    modality: str = "DX"
    photometric: str = "MONOCHROME2"
    bits_stored: int = 8
    rle: bool = False


@dataclass(frozen=True)
class SampleStudy:
    key: str
    patient_id: str
    patient_name: str
    patient_age: str  # DICOM AS, e.g. "004Y"
    sex: str
    description: str
    images: tuple[SampleImage, ...]


def _first(folder: Path) -> Path:
    return sorted(folder.iterdir())[0]


def _pixels(source: Path) -> np.ndarray:
    """The source image as float [0, 1], MONOCHROME2 appearance, at most 512 px on a side."""
    if source.suffix == ".dcm":
        ds = pydicom.dcmread(source)
        arr = ds.pixel_array.astype(np.float32)
        arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1.0)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            arr = 1.0 - arr
        image = Image.fromarray((arr * 255).astype(np.uint8))
    else:
        image = Image.open(source).convert("L")
    image.thumbnail((512, 512), Image.LANCZOS)
    return np.asarray(image, dtype=np.float32) / 255.0


def _image_dataset(study: SampleStudy, image: SampleImage, index: int) -> Dataset:
    pixels = _pixels(image.source)
    max_value = (1 << image.bits_stored) - 1
    stored = np.round(pixels * max_value)
    if image.photometric == "MONOCHROME1":
        stored = max_value - stored
    dtype = np.uint8 if image.bits_stored <= 8 else np.uint16

    sop_class = CR_IMAGE if image.modality == "CR" else DX_FOR_PRESENTATION
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    study_date = dt.date(2026, 1, 5 + int(study.key[-1]))
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = derive_uid("pneumo-sample", study.key, "image", index)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = derive_uid("pneumo-sample", study.key, "study")
    ds.SeriesInstanceUID = derive_uid("pneumo-sample", study.key, "series", index)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
    ds.AccessionNumber = f"ACC{study.key}"
    ds.StudyID = study.key
    ds.StudyDescription = study.description
    ds.Modality = image.modality
    ds.Manufacturer = "pneumo demo"
    ds.ReferringPhysicianName = ""
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = study.sex
    ds.PatientAge = study.patient_age
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = image.view
    ds.PatientOrientation = ["L", "F"] if image.view == "LL" else ["R", "F"]
    ds.SeriesNumber = index + 1
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.NumberOfStudyRelatedInstances = len(study.images)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = image.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 8 if dtype is np.uint8 else 16
    ds.BitsStored = image.bits_stored
    ds.HighBit = image.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = -1 if image.photometric == "MONOCHROME1" else 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PixelData = stored.astype(dtype).tobytes()
    if image.rle:
        ds.compress(RLELossless, generate_instance_uid=False)
    return ds


def sample_studies() -> tuple[SampleStudy, ...]:
    kermany = SHARED / "kermany" / "test"
    cxr = SHARED / "dicom" / "cxr"
    normal = _first(kermany / "NORMAL")
    pneumonia = _first(kermany / "PNEUMONIA")
    return (
        SampleStudy(
            "DEMO1",
            "DEMO0001",
            "DEMO^NORMAL^CHILD",
            "004Y",
            "F",
            "Chest PA (pediatric)",
            (SampleImage(normal, "PA"),),
        ),
        SampleStudy(
            "DEMO2",
            "DEMO0002",
            "DEMO^PNEUMONIA^CHILD",
            "006Y",
            "M",
            "Chest PA and lateral (pediatric)",
            (SampleImage(pneumonia, "PA"), SampleImage(pneumonia, "LL")),
        ),
        SampleStudy(
            "DEMO3",
            "DEMO0003",
            "DEMO^ADULT",
            "058Y",
            "M",
            "Chest PA (adult: outside intended use)",
            (SampleImage(next(cxr.glob("nih_gcp_*.dcm")), "PA"),),
        ),
        SampleStudy(
            "DEMO4",
            "DEMO0004",
            "DEMO^CR^MONOCHROME1",
            "009Y",
            "F",
            "Chest PA, CR MONOCHROME1 12-bit, RLE",
            (
                SampleImage(
                    cxr / "RG1_UNCR.dcm",
                    "PA",
                    modality="CR",
                    photometric="MONOCHROME1",
                    bits_stored=12,
                    rle=True,
                ),
            ),
        ),
    )


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.dcm"):
        old.unlink()
    for study in sample_studies():
        for index, image in enumerate(study.images):
            ds = _image_dataset(study, image, index)
            path = OUT / f"{study.key.lower()}_{index + 1}_{image.view.lower()}.dcm"
            ds.save_as(path, enforce_file_format=True)
            print(f"{path.relative_to(REPO)}  {path.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
