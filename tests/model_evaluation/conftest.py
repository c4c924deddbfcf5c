"""Shared fixtures: the shared data folder and a small labelled folder tree built from it."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import need_shared
from tests.paths import DICOM_DATA, KERMANY, PNEUMONIAMNIST

KERMANY_TEST = KERMANY / "test"
MNIST_NPZ = PNEUMONIAMNIST / "pneumoniamnist.npz"
CXR_DICOM = DICOM_DATA / "cxr"
OTHER_DICOM = DICOM_DATA / "other"


@dataclass(frozen=True)
class FakeInfo:
    name: str = "fake"
    version: str = "0.0.0"
    sha256: str = "0" * 64
    threshold: float = 0.5


@dataclass(frozen=True)
class FakePrediction:
    probability: float
    ood_score: float
    is_chest: bool


class BrightnessPredictor:
    """A stand-in for ``model.inference.Predictor`` with a known, checkable rule.

    It runs the real preprocessing (so too-small images are rejected exactly as
    the real model rejects them), then scores the mean brightness of the squashed
    [0, 1] image; images whose long side is more than ``max_aspect`` times the
    short side are called "not a chest radiograph".
    """

    info = FakeInfo()

    def __init__(self, max_aspect: float = 3.0) -> None:
        self.max_aspect = max_aspect
        self.calls: list[int] = []

    def predict(self, images: Sequence[np.ndarray]) -> list[FakePrediction]:
        from model.preprocess import resize_to_input, to_model_batch

        to_model_batch(images)  # raises ValueError for images the model cannot take
        self.calls.append(len(images))
        out = []
        for image in images:
            prob = float(resize_to_input(image).mean())
            aspect = max(image.shape) / min(image.shape)
            out.append(FakePrediction(prob, aspect, aspect <= self.max_aspect))
        return out


def kermany_files(n_per_class: int) -> dict[str, list[Path]]:
    root = need_shared(KERMANY_TEST)
    return {
        cls: sorted((root / cls).glob("*.jpeg"))[:n_per_class] for cls in ("NORMAL", "PNEUMONIA")
    }


@pytest.fixture
def predictor_cls() -> type[BrightnessPredictor]:
    return BrightnessPredictor


@pytest.fixture
def mnist_npz() -> Path:
    return need_shared(MNIST_NPZ)


@pytest.fixture
def cxr_dicom() -> Path:
    return need_shared(CXR_DICOM)


@pytest.fixture
def other_dicom() -> Path:
    return need_shared(OTHER_DICOM)


@pytest.fixture
def kermany_test() -> Path:
    return need_shared(KERMANY_TEST)


@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    """NORMAL/ and PNEUMONIA/ with 6 real JPEGs each plus a broken file and a thin strip."""
    from PIL import Image

    root = tmp_path / "set"
    for cls, files in kermany_files(6).items():
        (root / cls).mkdir(parents=True)
        for f in files:
            shutil.copy(f, root / cls / f.name)
    (root / "NORMAL" / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "NORMAL" / ".hidden.jpeg").write_bytes(b"ignored")
    # 4 x 400: too small for the model on one side -> rejected by preprocessing
    Image.fromarray(np.full((4, 400), 128, np.uint8)).save(root / "PNEUMONIA" / "strip.png")
    # 40 x 400: decodable, but the fake guard calls it "not a chest radiograph"
    Image.fromarray(np.full((40, 400), 128, np.uint8)).save(root / "PNEUMONIA" / "banner.png")
    return root
