"""The not-a-chest guard checked on files it never saw: one table for the notebook and the card.

:func:`check_guard` scores labelled groups of files (for the shared data: the
real chest DICOMs of ``dicom/cxr`` and the non-chest ones of ``dicom/other``)
and returns a :class:`GuardCheck`: one :class:`GuardRow` per file, the
guard's verdict and the counts the model card prints. The notebook's table and
the card's figures come from this one function over the same file list
(:func:`shared_dicom_files`), so they cannot disagree.

``model`` never imports ``dicom_io``: the caller hands in the reader (for
DICOM, ``dicom_io.pixels.read_luminance_file``, which also scores colour
images). A file the reader cannot decode is a row with outcome
:attr:`GuardOutcome.UNREADABLE` and the error's kind, not an exception.
"""

from __future__ import annotations

import csv
import enum
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.evaluation import PredictorLike

__all__ = [
    "ANIMAL_GROUP",
    "CHEST_GROUP",
    "NON_CHEST_GROUP",
    "REFERENCE_GROUP",
    "GuardCheck",
    "GuardOutcome",
    "GuardRow",
    "check_guard",
    "check_reference",
    "shared_dicom_files",
]

CHEST_GROUP = "cxr"
"""Group name of real chest radiographs (the guard should pass them)."""
NON_CHEST_GROUP = "other"
"""Group name of non-chest images (the guard should flag them)."""
ANIMAL_GROUP = "animal"
"""An animal's chest radiograph: a radiograph of a thorax, but not of a child's."""
REFERENCE_GROUP = "reference"
"""The development non-chest images (``model.ood.non_chest_reference_images``): synthetic
images and sample pictures shipped in installed packages, never the shared test files."""


class GuardOutcome(str, enum.Enum):
    """What became of one file."""

    CHEST = "chest"
    """Passed the guard: a probability would be reported."""
    NOT_CHEST = "not-chest-xray"
    """Flagged: reported as 'not processed: not a chest radiograph'."""
    UNREADABLE = "unreadable"
    """The reader could not decode it; the guard never saw it."""


@dataclass(frozen=True)
class GuardRow:
    """One file's verdict."""

    group: str
    file: str
    """File name only (the shared files' names carry no patient data)."""
    outcome: GuardOutcome
    ood_score: float | None = None
    probability: float | None = None
    """P(pneumonia) the model gave before the guard (None when unreadable)."""
    detail: str = ""
    """Why it is unreadable (the reader's error kind); empty otherwise."""


@dataclass(frozen=True)
class GuardCheck:
    """Every file's verdict and the counts drawn from them."""

    threshold: float
    rows: tuple[GuardRow, ...]

    def decoded(self, group: str) -> tuple[GuardRow, ...]:
        """The rows of ``group`` the guard saw."""
        return tuple(
            r for r in self.rows if r.group == group and r.outcome is not GuardOutcome.UNREADABLE
        )

    def flagged(self, group: str) -> int:
        """How many decoded files of ``group`` the guard flagged as not a chest radiograph."""
        return sum(r.outcome is GuardOutcome.NOT_CHEST for r in self.decoded(group))

    def passed(self, *groups: str) -> list[str]:
        """The files of ``groups`` the guard let through as chest radiographs, sorted."""
        return sorted(
            r.file for g in groups for r in self.decoded(g) if r.outcome is GuardOutcome.CHEST
        )

    def summary(self) -> dict[str, str]:
        """The card's lines: ``{label: value}`` (``model.card`` prints them as a list)."""
        out: dict[str, str] = {"guard threshold": f"{self.threshold:.3f}"}
        other = self.decoded(NON_CHEST_GROUP)
        if other:
            out[f"dicom/{NON_CHEST_GROUP} decodable non-chest flagged"] = (
                f"{self.flagged(NON_CHEST_GROUP)} of {len(other)}"
            )
            out[f"dicom/{NON_CHEST_GROUP} non-chest scored p >= 0.5 before the guard"] = (
                f"{sum((r.probability or 0.0) >= 0.5 for r in other)} of {len(other)}"
            )
            out[f"dicom/{NON_CHEST_GROUP} files that pass the guard"] = (
                ", ".join(self.passed(NON_CHEST_GROUP)) or "none"
            )
        chest = self.decoded(CHEST_GROUP)
        if chest:
            out["real chest radiograph DICOMs flagged (should pass)"] = (
                f"{self.flagged(CHEST_GROUP)} of {len(chest)}"
            )
        for r in self.decoded(ANIMAL_GROUP):
            verdict = "flagged" if r.outcome is GuardOutcome.NOT_CHEST else "passed"
            out[f"animal chest radiograph {r.file}"] = f"ood_score {r.ood_score:.2f}, {verdict}"
        reference = self.decoded(REFERENCE_GROUP)
        if reference:
            out["development non-chest images flagged"] = (
                f"{self.flagged(REFERENCE_GROUP)} of {len(reference)}"
            )
            out["development images that pass the guard"] = (
                ", ".join(self.passed(REFERENCE_GROUP)) or "none"
            )
        unreadable = [r for r in self.rows if r.outcome is GuardOutcome.UNREADABLE]
        if unreadable:
            out["files the reader could not decode (not counted)"] = str(len(unreadable))
        return out

    def to_json(self) -> dict[str, Any]:
        """``summary`` plus every row, JSON-ready (``outcome`` as its value)."""
        rows = [asdict(r) | {"outcome": r.outcome.value} for r in self.rows]
        return {"threshold": self.threshold, "summary": self.summary(), "rows": rows}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GuardCheck:
        """A check back from :meth:`to_json`'s form (``summary`` is derived, not read)."""
        rows = tuple(
            GuardRow(
                str(r["group"]),
                str(r.get("file", "")),
                GuardOutcome(r["outcome"]),
                r.get("ood_score"),
                r.get("probability"),
                str(r.get("detail", "")),
            )
            for r in data.get("rows") or ()
        )
        return cls(float(data.get("threshold", float("nan"))), rows)

    def write_json(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


def shared_dicom_files(shared_data: Path) -> dict[str, list[Path]]:
    """The ``*.dcm`` files of ``<shared_data>/dicom/cxr`` and ``/other``, by what they show.

    ``dicom/other`` holds, besides non-chest images, header variants of real
    human chest radiographs (their ``index.csv`` source names NIH ChestX-ray14)
    and an animal's chest radiograph (body part CHEST otherwise). By that index,
    the former join :data:`CHEST_GROUP` (the guard should pass them) and the
    latter :data:`ANIMAL_GROUP` (reported, not counted either way). A missing
    folder gives empty lists, so a machine without the shared data gets an
    empty check rather than an error.
    """
    root = Path(shared_data) / "dicom"
    groups: dict[str, list[Path]] = {CHEST_GROUP: [], NON_CHEST_GROUP: [], ANIMAL_GROUP: []}
    if (root / CHEST_GROUP).is_dir():
        groups[CHEST_GROUP] = sorted((root / CHEST_GROUP).glob("*.dcm"))
    index = _index_rows(root / NON_CHEST_GROUP / "index.csv")
    for path in sorted((root / NON_CHEST_GROUP).glob("*.dcm")):
        row = index.get(path.name, {})
        if "ChestX-ray14" in row.get("source", ""):
            groups[CHEST_GROUP].append(path)
        elif row.get("body_part", "").strip().upper() == "CHEST":
            groups[ANIMAL_GROUP].append(path)
        else:
            groups[NON_CHEST_GROUP].append(path)
    return groups


def _index_rows(index: Path) -> dict[str, dict[str, str]]:
    """``index.csv`` rows by file name (``other/<name>`` in its ``file`` column)."""
    if not index.is_file():
        return {}
    with index.open(newline="") as f:
        return {row["file"].rsplit("/", 1)[-1]: row for row in csv.DictReader(f)}


def check_guard(
    predictor: PredictorLike,
    files: Mapping[str, Sequence[Path]],
    read: Callable[[Path], np.ndarray],
) -> GuardCheck:
    """Score every file of every group with ``predictor``; one :class:`GuardRow` each.

    ``predictor.info`` must have ``ood_threshold`` (``model.inference.ModelInfo`` has).

    ``read`` turns a file into a 2-D float image in [0, 1]; whatever it raises
    makes the row :attr:`GuardOutcome.UNREADABLE`, with the error's ``kind``
    attribute (``dicom_io.pixels.PixelReadError`` has one) or its type name.
    """
    rows: list[GuardRow] = []
    for group, paths in files.items():
        for path in paths:
            try:
                image = read(path)
            except Exception as exc:  # any decoder failure is a row, not a crash
                kind = getattr(exc, "kind", None)
                detail = str(getattr(kind, "value", kind) or type(exc).__name__)
                rows.append(GuardRow(group, path.name, GuardOutcome.UNREADABLE, detail=detail))
                continue
            (pred,) = predictor.predict([image])
            outcome = GuardOutcome.CHEST if pred.is_chest else GuardOutcome.NOT_CHEST
            rows.append(
                GuardRow(group, path.name, outcome, float(pred.ood_score), float(pred.probability))
            )
    return GuardCheck(float(predictor.info.ood_threshold), tuple(rows))


def check_reference(
    predictor: PredictorLike, images: Mapping[str, np.ndarray] | None = None
) -> GuardCheck:
    """The guard on the development non-chest images: a check before any test set is read.

    ``images`` defaults to :func:`model.ood.non_chest_reference_images`; each is
    one :data:`REFERENCE_GROUP` row. A candidate whose guard passes some of them
    is unlikely to meet the guard's target on ``dicom/other`` (pneumonet-2.3.0
    passed 6 of 15 here and 8 of 28 there), so ``scripts/model-release`` stops
    before scoring ``kermany/test`` (``pneumo model guard --reference --gate``).
    """
    if images is None:
        from model.ood import non_chest_reference_images

        images = non_chest_reference_images()
    names = list(images)
    predictions = predictor.predict([images[n] for n in names])
    rows = tuple(
        GuardRow(
            REFERENCE_GROUP,
            name,
            GuardOutcome.CHEST if pred.is_chest else GuardOutcome.NOT_CHEST,
            float(pred.ood_score),
            float(pred.probability),
        )
        for name, pred in zip(names, predictions, strict=True)
    )
    return GuardCheck(float(predictor.info.ood_threshold), rows)
