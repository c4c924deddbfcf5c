"""Labelled evaluation sets: a NORMAL/PNEUMONIA folder tree or a PneumoniaMNIST ``.npz``.

A dataset is a list of :class:`LabelledItem` plus a way to load each one as a
2-D float32 image in [0, 1] -- the input every other part of ``model`` takes.
Loading is per item and may fail (a broken JPEG, an undecodable DICOM); the
caller decides what to do with the failure (``model.evaluation`` records it as
"not processed" and carries on), so one bad file never loses the others.

DICOM files are decoded by a ``read_dicom`` callable the caller passes in
(``pneumo evaluate`` passes ``dicom_io``'s pixel reader): ``model`` must not
import ``dicom_io``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.images import IMAGE_SUFFIXES, load_image_file

__all__ = [
    "CLASS_FOLDERS",
    "DICOM_SUFFIXES",
    "NPZ_SPLITS",
    "DatasetError",
    "ItemKind",
    "LabelledDataset",
    "LabelledItem",
    "folder_dataset",
    "npz_dataset",
    "open_dataset",
    "stratified_subset",
]

#: Folder name -> label. Matching is case-insensitive (``normal/`` works too).
CLASS_FOLDERS: dict[str, int] = {"NORMAL": 0, "PNEUMONIA": 1}

#: Suffixes always treated as DICOM (files without a suffix are sniffed).
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})

#: The PneumoniaMNIST splits, stored as ``<split>_images`` / ``<split>_labels``.
NPZ_SPLITS = ("train", "val", "test")

ReadDicom = Callable[[Path], np.ndarray]


class DatasetError(ValueError):
    """The dataset itself (not one item of it) is unusable."""


class ItemKind(enum.Enum):
    """How an item's pixels are obtained."""

    IMAGE = "image"  # JPEG/PNG/... via model.images
    DICOM = "dicom"  # via the injected read_dicom
    ARRAY = "array"  # an image held in an .npz file


@dataclass(frozen=True)
class LabelledItem:
    """One labelled image. ``ref`` is what reports show: a path relative to the
    dataset root, or ``<file>.npz:<split>:<index>``."""

    ref: str
    label: int
    kind: ItemKind
    path: Path
    index: int | None = None  # position inside an .npz split


class LabelledDataset:
    """A sequence of labelled items with a loader for their pixels."""

    def __init__(
        self,
        name: str,
        items: Sequence[LabelledItem],
        *,
        read_dicom: ReadDicom | None = None,
        arrays: np.ndarray | None = None,
    ) -> None:
        self.name = name
        self.items: tuple[LabelledItem, ...] = tuple(items)
        self._read_dicom = read_dicom
        self._arrays = arrays

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[LabelledItem]:
        return iter(self.items)

    @property
    def labels(self) -> np.ndarray:
        return np.array([item.label for item in self.items], dtype=np.int8)

    def class_counts(self) -> dict[str, int]:
        """``{"NORMAL": n0, "PNEUMONIA": n1}``."""
        labels = self.labels
        return {
            name: int(np.count_nonzero(labels == value)) for name, value in CLASS_FOLDERS.items()
        }

    def subset(self, indices: Sequence[int]) -> LabelledDataset:
        """A dataset of the given items (same loader)."""
        return LabelledDataset(
            self.name,
            [self.items[i] for i in indices],
            read_dicom=self._read_dicom,
            arrays=self._arrays,
        )

    def load(self, item: LabelledItem) -> np.ndarray:
        """The item's pixels as a 2-D float32 array in [0, 1].

        Raises whatever the underlying decoder raises (``model.images.ImageLoadError``,
        ``dicom_io.pixels.PixelReadError``, ...) or :class:`DatasetError` when no
        DICOM reader was given.
        """
        if item.kind is ItemKind.IMAGE:
            return load_image_file(item.path)
        if item.kind is ItemKind.DICOM:
            if self._read_dicom is None:
                raise DatasetError("DICOM file but no DICOM reader was given")
            image = np.asarray(self._read_dicom(item.path), dtype=np.float32)
            if image.ndim != 2:
                raise DatasetError(f"DICOM reader returned shape {image.shape}, expected 2-D")
            return image
        assert self._arrays is not None and item.index is not None
        raw = self._arrays[item.index]
        result: np.ndarray
        if raw.dtype == np.uint8:
            result = raw.astype(np.float32) / 255.0
        else:
            result = np.clip(raw.astype(np.float32), 0.0, 1.0)
        return result


def _is_dicom_file(path: Path) -> bool:
    """DICOM by suffix, or by the "DICM" magic after the 128-byte preamble (PS3.10 §7.1)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return False
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _class_dirs(root: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for child in sorted(root.iterdir()):
        if child.is_dir() and child.name.upper() in CLASS_FOLDERS:
            label = CLASS_FOLDERS[child.name.upper()]
            if label in found:
                raise DatasetError(f"two folders for class {child.name.upper()} in {root}")
            found[label] = child
    return found


def folder_dataset(root: Path, *, read_dicom: ReadDicom | None = None) -> LabelledDataset:
    """Every non-hidden file below ``root/NORMAL`` and ``root/PNEUMONIA`` (recursively).

    Files are not opened here; an undecodable one fails later, in
    :meth:`LabelledDataset.load`, and is reported rather than skipped silently.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"not a folder: {root}")
    dirs = _class_dirs(root)
    if not dirs:
        raise DatasetError(f"{root} has neither a NORMAL/ nor a PNEUMONIA/ subfolder")
    items: list[LabelledItem] = []
    for label, folder in sorted(dirs.items()):
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(root)
            if not path.is_file() or any(part.startswith(".") for part in rel.parts):
                continue
            kind = ItemKind.DICOM if _is_dicom_file(path) else ItemKind.IMAGE
            items.append(LabelledItem(ref=rel.as_posix(), label=label, kind=kind, path=path))
    if not items:
        raise DatasetError(f"no files below the class folders of {root}")
    name = f"{root.parent.name}/{root.name}" if root.parent.name else root.name
    return LabelledDataset(name, items, read_dicom=read_dicom)


def npz_dataset(path: Path, split: str = "test") -> LabelledDataset:
    """One split of a PneumoniaMNIST-style ``.npz`` (``<split>_images``, ``<split>_labels``)."""
    path = Path(path)
    if split not in NPZ_SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose one of {', '.join(NPZ_SPLITS)}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            if f"{split}_images" not in keys or f"{split}_labels" not in keys:
                raise DatasetError(f"{path.name} has no {split}_images/{split}_labels arrays")
            images = npz[f"{split}_images"]
            labels = np.asarray(npz[f"{split}_labels"]).reshape(-1)
    except (OSError, ValueError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"cannot read {path.name}: {exc}") from exc
    if images.ndim == 4 and images.shape[-1] in (1, 3):  # (N, H, W, C): take luminance
        images = (
            images.mean(axis=-1).astype(images.dtype) if images.shape[-1] == 3 else images[..., 0]
        )
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{path.name}: {images.shape[0]} images vs {labels.shape[0]} labels "
            f"or not (N, H, W) images: {images.shape}"
        )
    if not np.isin(labels, (0, 1)).all():
        raise DatasetError(f"{path.name}: labels must be 0/1")
    items = [
        LabelledItem(
            ref=f"{path.name}:{split}:{i}", label=int(lab), kind=ItemKind.ARRAY, path=path, index=i
        )
        for i, lab in enumerate(labels)
    ]
    return LabelledDataset(f"{path.stem}:{split}", items, arrays=images)


def open_dataset(
    path: Path, *, split: str = "test", read_dicom: ReadDicom | None = None
) -> LabelledDataset:
    """A folder tree or an ``.npz``, whichever ``path`` is."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".npz":
        return npz_dataset(path, split)
    if path.is_dir():
        return folder_dataset(path, read_dicom=read_dicom)
    raise DatasetError(f"{path} is neither a folder with NORMAL/ and PNEUMONIA/ nor an .npz file")


def stratified_subset(dataset: LabelledDataset, n: int, seed: int = 0) -> LabelledDataset:
    """At most ``n`` items, keeping the class proportions; seeded, order preserved."""
    if n >= len(dataset):
        return dataset
    rng = np.random.default_rng(seed)
    labels = dataset.labels
    chosen: list[int] = []
    for value in (0, 1):
        idx = np.flatnonzero(labels == value)
        take = int(round(n * idx.size / labels.size))
        if idx.size and take == 0:
            take = 1  # keep both classes present so AUC stays defined
        chosen.extend(rng.choice(idx, size=min(take, idx.size), replace=False).tolist())
    return dataset.subset(sorted(chosen))
