"""Stage 2, select and read, on a hand-made loaded study: reasons, images, timings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from dicom_io.selection import SkipReason
from tests.worker.studies import CT, CXR
from worker.stages.load import LoadedInstance, LoadedStudy
from worker.stages.read import select_and_read
from worker.stages.timing import StageTimer


def test_selects_the_chest_image_and_keeps_a_reason_for_every_other(dicom_data: Path) -> None:
    truncated = pydicom.dcmread(CXR)
    truncated.PixelData = truncated.PixelData[:100]
    study = LoadedStudy(
        study_id=1,
        study_uid="1.2.3",
        revision=1,
        instances=(
            LoadedInstance(1, "1.2.3.1", pydicom.dcmread(CXR)),
            LoadedInstance(2, "1.2.3.2", pydicom.dcmread(CT)),
            LoadedInstance(3, "1.2.3.3", None, SkipReason.UNREADABLE),
            LoadedInstance(4, "1.2.3.4", truncated),
        ),
    )
    timer = StageTimer()

    read = select_and_read(study, max_pixels_bits=2**31, timer=timer)

    assert read.study is study
    cxr, ct, unreadable, broken = read.instances
    assert cxr.image is not None and cxr.image.ndim == 2 and cxr.skip_reason is None
    assert 0.0 <= float(np.min(cxr.image)) and float(np.max(cxr.image)) <= 1.0
    assert ct.image is None and ct.skip_reason == SkipReason.modality("CT")
    assert unreadable.image is None and unreadable.skip_reason == "unreadable"
    assert broken.image is None and str(broken.skip_reason).startswith("undecodable:")
    assert read.usable == (cxr,)
    assert list(timer.seconds) == ["select", "read_pixels"]


def test_pixel_cap_skips_instead_of_decoding(dicom_data: Path) -> None:
    study = LoadedStudy(1, "1.2.3", 1, (LoadedInstance(1, "1.2.3.1", pydicom.dcmread(CXR)),))
    (item,) = select_and_read(study, max_pixels_bits=1024).instances
    assert item.image is None and item.skip_reason == "undecodable:decompression-bomb"
