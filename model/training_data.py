"""Training data: Kermany ``train`` split, a patient-level validation split, a pixel cache.

The validation split is carved from ``kermany/train`` by *patient*, never by
file, so no patient contributes to both sides:

* pneumonia files are named ``personNNN_bacteria_MMMM.jpeg`` / ``personNNN_virus_MMMM.jpeg``
  -> patient ``personNNN``;
* normal files are ``IM-xxxx-yyyy.jpeg`` or ``NORMAL2-IM-xxxx-yyyy.jpeg`` -> one patient per
  ``IM-xxxx`` / ``NORMAL2-IM-xxxx`` number.

``kermany/test`` is never read here: nothing is selected on it.

Every image is decoded once, squash-resized with :func:`model.preprocess.resize_to_input`
(the same function serving uses) and kept as uint8 in one array that is cached on disk
(``.npy``, not committed) so epochs do not re-decode JPEGs.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.images import IMAGE_SUFFIXES, load_image_file
from model.preprocess import INPUT_SIZE, resize_to_input

__all__ = ["CLASSES", "Sample", "list_samples", "load_pixels", "patient_of", "patient_split"]

log = logging.getLogger(__name__)

CLASSES = ("NORMAL", "PNEUMONIA")

_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 = NORMAL, 1 = PNEUMONIA
    patient: str


def patient_of(name: str) -> str:
    """The patient key of a Kermany file name (see module docstring)."""
    for pattern in (_PERSON, _NORMAL):
        m = pattern.match(name)
        if m:
            return m.group(1).upper()
    return name  # unknown naming: treat the file as its own patient


def list_samples(root: Path) -> list[Sample]:
    """All images under ``root/NORMAL`` and ``root/PNEUMONIA``, sorted by path."""
    out: list[Sample] = []
    for label, cls in enumerate(CLASSES):
        folder = root / cls
        if not folder.is_dir():
            raise FileNotFoundError(f"missing class folder {cls}/ under {root}")
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                out.append(Sample(p, label, f"{cls}:{patient_of(p.name)}"))
    return out


def patient_split(
    samples: Sequence[Sample], val_fraction: float = 0.15, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Split into (train, val) by patient, stratified by class, reproducibly."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be in (0, 1)")
    rng = random.Random(seed)
    val_patients: set[str] = set()
    for label in (0, 1):
        patients = sorted({s.patient for s in samples if s.label == label})
        rng.shuffle(patients)
        n_images = sum(1 for s in samples if s.label == label)
        per_patient: dict[str, int] = {}
        for s in samples:
            if s.label == label:
                per_patient[s.patient] = per_patient.get(s.patient, 0) + 1
        taken = 0
        for p in patients:  # take whole patients until the image quota is met
            if taken >= val_fraction * n_images:
                break
            val_patients.add(p)
            taken += per_patient[p]
    train = [s for s in samples if s.patient not in val_patients]
    val = [s for s in samples if s.patient in val_patients]
    return train, val


def _decode(path: Path, size: int) -> np.ndarray:
    t = resize_to_input(load_image_file(path), size)[0].numpy()
    return np.round(t * 255.0).astype(np.uint8)


def _decode_chunk(args: tuple[list[Path], int]) -> np.ndarray:
    import torch

    torch.set_num_threads(1)
    paths, size = args
    return np.stack([_decode(p, size) for p in paths])


def load_pixels(
    samples: Sequence[Sample],
    size: int = INPUT_SIZE,
    cache_dir: Path | None = None,
    workers: int = 2,
) -> np.ndarray:
    """(N, size, size) uint8 array of the resized images, cached by file list + size."""
    key = hashlib.sha256(
        ("\n".join(str(s.path.resolve()) for s in samples) + f"|{size}").encode()
    ).hexdigest()[:16]
    cache = cache_dir / f"pixels-{size}-{key}.npy" if cache_dir else None
    if cache is not None and cache.exists():
        arr = np.load(cache)
        if arr.shape == (len(samples), size, size):
            result: np.ndarray = arr
            return result
    paths = [s.path for s in samples]
    chunks = [(paths[i : i + 256], size) for i in range(0, len(paths), 256)]
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(workers) as ex:
            parts = list(ex.map(_decode_chunk, chunks))
    else:
        parts = [_decode_chunk(c) for c in chunks]
    arr = np.concatenate(parts) if parts else np.zeros((0, size, size), np.uint8)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, arr)
        tmp.replace(cache)
    return arr
